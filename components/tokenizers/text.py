"""A WordPiece text tokenizer trained on the dataset's own captions (HuggingFace ``tokenizers``).

BERT's recipe (Devlin et al., 2019; the WordPiece model of Wu et al., 2016): BERT normalizer
(lower-case, accents stripped), BERT pre-tokenizer (whitespace + punctuation), WordPiece with
``##`` continuation pieces, and the post-processor ``[CLS] text [SEP]``. Nothing is downloaded:
the vocabulary is fitted on the train split's captions and saved as one ``tokenizer.json`` (the
library's own format), which is the versioned artifact of the pipeline's ``tokenizer[...]`` step.

:class:`TextTokenizer` wraps a fitted file for the model side: fixed-length id tensors with an
attention mask, special-token ids and the word -> id map used for hard negatives and probes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from components.errors import ReprflowError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Fixed order, so the special ids are 0..4 in every vocabulary this module fits.
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
TOKENIZER_FILE = "tokenizer.json"


class WordPieceSettings(BaseModel):
    """Settings of :func:`fit_wordpiece` (the ``settings`` of a ``kind: wordpiece`` tokenizer)."""

    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(1000, ge=len(SPECIAL_TOKENS) + 1, le=1_000_000, description="upper bound; a small corpus yields fewer tokens")
    min_frequency: int = Field(2, ge=1, description="a piece must occur this often to be kept")
    lowercase: bool = True
    limit_alphabet: int = Field(1000, ge=1, description="most frequent characters kept as the initial alphabet")


def _pipeline(tok, cfg: WordPieceSettings) -> None:
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=cfg.lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")


def fit_wordpiece(texts: Iterable[str], settings: dict, out_dir: Path) -> dict[str, str]:
    """Fit a WordPiece vocabulary on ``texts`` and write ``tokenizer.json`` into ``out_dir``.

    The text-tokenizer fit contract of ``components/tokenizers/registry.py``: returns
    ``{"tokenizer": "tokenizer.json"}``. The same texts and settings always give the same file.

    ``tokenizers``' trainer alone does not (huggingface/tokenizers#1794): it gives the ``##c``
    continuation pieces ids in hash-map order, and those ids break ties between equally frequent
    merges. So every ``##c`` of the corpus is declared up front, with sorted ids, as a *training*
    special token; the fitted vocabulary is then loaded into a fresh WordPiece model in which
    only ``[PAD] [UNK] [CLS] [SEP] [MASK]`` are special.
    """
    from tokenizers import Tokenizer, models, processors, trainers

    try:
        cfg = WordPieceSettings.model_validate(settings or {})
    except Exception as exc:  # noqa: BLE001 - pydantic's message names the field
        raise ReprflowError(f"wordpiece settings: {exc}") from None
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ReprflowError("wordpiece: no captions to fit a tokenizer on (the dataset's train split has no 'captions')")
    tok = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    _pipeline(tok, cfg)
    norm, pre = tok.normalizer, tok.pre_tokenizer
    chars = sorted({c for t in texts for word, _ in pre.pre_tokenize_str(norm.normalize_str(t)) for c in word[1:]})
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=[*SPECIAL_TOKENS, *(f"##{c}" for c in chars)],
        limit_alphabet=cfg.limit_alphabet, continuing_subword_prefix="##", show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    final = Tokenizer(models.WordPiece(vocab=tok.get_vocab(), unk_token=UNK, continuing_subword_prefix="##"))
    _pipeline(final, cfg)
    final.add_special_tokens(list(SPECIAL_TOKENS))
    final.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, final.token_to_id(CLS)), (SEP, final.token_to_id(SEP))],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final.save(str(out_dir / TOKENIZER_FILE))
    return {"tokenizer": TOKENIZER_FILE}


class TextTokenizer:
    """A fitted tokenizer file as fixed-length tensors: ``[CLS] pieces [SEP] [PAD]...``."""

    def __init__(self, path: str | Path, max_length: int = 40):
        from tokenizers import Tokenizer

        self.path = str(path)
        self.max_length = int(max_length)
        self._tok = Tokenizer.from_file(self.path)
        self._tok.enable_truncation(max_length=self.max_length)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self._tok.token_to_id(t) for t in SPECIAL_TOKENS)
        if None in (self.pad_id, self.cls_id, self.sep_id, self.mask_id):
            raise ReprflowError(f"{path}: not a reprflow text tokenizer (missing one of {', '.join(SPECIAL_TOKENS)})")
        self._tok.enable_padding(pad_id=self.pad_id, pad_token=PAD, length=self.max_length)

    @property
    def vocab_size(self) -> int:
        """Number of ids (special tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of ``[PAD] [UNK] [CLS] [SEP] [MASK]``."""
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode texts -> ``(ids (N, max_length) long, attention mask (N, max_length) bool)``."""
        enc = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long).reshape(len(enc), self.max_length)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool).reshape(len(enc), self.max_length)
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text, special tokens and ``##`` joins removed."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def word_id(self, word: str) -> int | None:
        """The id of a word that is ONE whole-word piece of the vocabulary, else None."""
        return self._tok.token_to_id(self._tok.normalizer.normalize_str(word))

    def word_ids(self, words: Iterable[str]) -> dict[str, int]:
        """``{word: id}`` for those ``words`` that are single pieces (others are left out)."""
        out = {}
        for w in words:
            i = self.word_id(w)
            if i is not None:
                out[w] = i
        return out


def mask_tokens(ids: torch.Tensor, special_ids: Sequence[int], mask_id: int, vocab_size: int, prob: float = 0.15,
                protect: torch.Tensor | None = None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (Devlin et al., 2019, Sec. 3.1): each maskable token is chosen with ``prob``;
    a chosen token becomes ``[MASK]`` (80 %), a random non-special token (10 %) or stays (10 %).

    Special tokens (``[PAD] [CLS] [SEP]`` ...) and positions where ``protect`` is True are never
    chosen. Returns ``(masked ids, labels)`` with labels = the original id at chosen positions
    and -100 elsewhere.
    """
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    if protect is not None:
        special |= protect
    u = torch.rand(ids.shape, generator=generator).to(ids.device)
    chosen = (u < prob) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator).to(ids.device)
    normal = [i for i in range(vocab_size) if i not in set(special_ids)]
    pool = torch.tensor(normal, device=ids.device)
    random_ids = pool[torch.randint(len(pool), ids.shape, generator=generator).to(ids.device)]
    out = torch.where(chosen & (action < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
    return out, labels
