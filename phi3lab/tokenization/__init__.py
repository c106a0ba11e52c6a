"""`phi3lab.Phi3Tokenizer` and the parts behind it: one backend per tokenizer kind, the files of
a checkpoint's tokenizer, sandboxed chat templates, and training a small vocabulary.

- `tokenizer.py`: `Phi3Tokenizer`, everything users see (checks, BOS, batches, token text, chats).
- `backend.py`: the `TokenizerBackend` protocol `Phi3Tokenizer` runs on, and how token bytes are shown.
- `sentencepiece_backend.py`: Phi-3's SentencePiece `tokenizer.model` with its added tokens.
- `bpe_backend.py`: byte-level BPE `tokenizer.json` files (Phi-4-mini, Phi-4) run by the `tokenizers` library.
- `hf_files.py`: reading a Hugging Face tokenizer directory (and writing Phi-3's).
- `chat_template.py`: rendering a checkpoint's Jinja chat template in a sandbox.
- `training.py`: `train_sentencepiece`, a small Llama-style vocabulary (the shipped model's, tests').
"""

from phi3lab.tokenization.tokenizer import ChatTemplateError, Phi3Tokenizer

__all__ = ["ChatTemplateError", "Phi3Tokenizer"]
