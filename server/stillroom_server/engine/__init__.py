"""The torch side of Stillroom: models, training runs, losses, sampling, checkpoint files.

It sees token ids and tensors, never text, gRPC or SQL: the service layer converts in and out.
"""
