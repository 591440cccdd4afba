"""The SDK's own tokenizer (the `tokenizers` library on tokenizer.json, used where transformers is
not installed) encodes, decodes and names special tokens exactly as transformers' tokenizer does on
the same files from the server."""

from __future__ import annotations

from stillroom import _tokenizers
from stillroom._proto import stillroom_pb2 as pb

from conftest import TINY

TEXTS = ["Hello, Stillroom!\n", "12+3= >15", "  spaces\tand\ttabs ~{}|", ""]


def test_the_sdk_alone_tokenizes_as_transformers_does(service, tokenizer):
    connection = service._connection
    reply = connection.run(connection.call("GetTokenizer", pb.GetTokenizerRequest(base_model=TINY)))
    fast = _tokenizers.FastTokenizer(_tokenizers._cached_folder(tuple(sorted(reply.files.items()))))
    assert type(tokenizer).__name__ != "FastTokenizer"  # the dev install has transformers
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(fast, name) == getattr(tokenizer, name), name
    assert len(fast) == len(tokenizer)
    for text in TEXTS:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(text), tokenizer.eos_token_id]
        assert fast.encode(text) == tokenizer.encode(text), text
        assert fast.decode(ids) == tokenizer.decode(ids), text
        assert fast.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
