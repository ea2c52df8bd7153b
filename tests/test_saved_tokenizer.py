"""A workdir's saved tokenizer read without transformers answers exactly as transformers' does."""

import subprocess
import sys

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from configs import fusion
from earthgptx_jax import template
from earthgptx_jax import tokenizer as tk

TEXTS = ["what is in the region? a ship near the plane", "segment the storage tank",
         "[12,40,300,512] the building is left of the vehicle"] * 20
PROBES = ["What is inside <vp1>? a ship [SEG] near [BOX] the plane",
          "  two  spaces\tand\nlines ", "typed specials stay text: <im_patch> <vp> [SEG]",
          "ünïcode ✓ 中文", "", "[1,2,3,4]"]


def test_saved_tokenizer_matches_transformers_and_imports_no_torch(tmp_path):
  vocab = fusion.get_config("tiny").model.llm.vocab_size
  slow = tk.build_tokenizer(TEXTS, vocab, tmp_path)
  fast = tk.load_saved_tokenizer(tmp_path)
  assert isinstance(fast, tk.SavedTokenizer)
  assert len(fast) == len(slow) and fast.get_vocab() == slow.get_vocab()
  assert tk.special_token_ids(fast) == tk.special_token_ids(slow)
  assert (fast.unk_token_id, fast.pad_token) == (slow.unk_token_id, slow.pad_token)
  for text in PROBES:
    for add in (True, False):
      for split in (True, False):
        kwargs = dict(add_special_tokens=add, split_special_tokens=split)
        ids = slow.encode(text, **kwargs)
        assert fast.encode(text, **kwargs) == ids, (text, kwargs)
        for skip in (True, False):
          assert fast.decode(ids, skip_special_tokens=skip) == slow.decode(
              ids, skip_special_tokens=skip)
  code = ("import sys; from earthgptx_jax import tokenizer as tk; "
          f"tk.load_saved_tokenizer({str(tmp_path)!r}).encode('a ship'); "
          "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_other_tokenizer_folders_load_with_transformers(tmp_path):
  """A folder without every special token (or of another class) is left to load_tokenizer,
  which adds them."""
  words = ["<unk>", "hello", "world", "ship"]
  base = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  base.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=base, unk_token="<unk>").save_pretrained(
      tmp_path)
  tok = tk.load_saved_tokenizer(tmp_path)
  assert not isinstance(tok, tk.SavedTokenizer)
  assert tok.convert_tokens_to_ids(template.SEG) == len(words) + template.SPECIAL_TOKENS.index(
      template.SEG)
