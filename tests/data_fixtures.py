"""Helpers shared by the data-pipeline tests."""

from earthgptx_jax import template


def make_test_tokenizer(texts, vocab_size=400):
  """A small byte-level BPE with the template's special tokens (any HF tokenizer that has
  them works with the loader; the project's own comes from earthgptx_jax.tokenizer)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  specials = ["<unk>", "<s>", "</s>", template.PAD, *template.SPECIAL_TOKENS]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token=template.PAD, unk_token="<unk>",
                                 additional_special_tokens=list(template.SPECIAL_TOKENS))
