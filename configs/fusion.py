"""EarthGPT-X one-stage fusion training config.

Usage: `--config=configs/fusion.py:PRESET`, PRESET in {paper, paper13b, tiny}; `paper` is the
default. Every size used by a module lives here; modules hold no size literals.
"""

import ml_collections

ConfigDict = ml_collections.ConfigDict


def _llm(preset):
  if preset == "paper":  # LLaMA-2-7B
    return dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096)
  if preset == "paper13b":  # LLaMA-2-13B
    return dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                num_heads=40, num_kv_heads=40, head_dim=128, max_position_embeddings=4096)
  if preset == "tiny":
    return dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
  raise ValueError(f"config preset: unknown value {preset!r}; expected paper, paper13b or tiny")


def get_config(arg: str | None = None) -> ConfigDict:
  preset = arg or "paper"
  is_tiny = preset == "tiny"
  config = ConfigDict()
  config.preset = preset
  config.seed = 0

  model = config.model = ConfigDict()
  llm = model.llm = ConfigDict(_llm(preset))
  llm.rms_norm_eps = 1e-5 if not is_tiny else 1e-6
  llm.rope_theta = 10000.0
  # None, or HF-style dict, e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
  # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}.
  llm.rope_scaling = None
  llm.tie_word_embeddings = False
  llm.dtype = "float32" if is_tiny else "bfloat16"  # compute dtype
  llm.param_dtype = "float32"
  llm.remat = not is_tiny
  llm.scan_layers = not is_tiny
  llm.attention_impl = "xla"  # xla | cudnn | auto (see issue 9)
  llm.pretrained_path = None  # local HF LlamaForCausalLM folder
  llm.tokenizer_path = None  # local HF tokenizer folder; None -> project tokenizer for tiny

  # Filled by the vision issue (3): mixed CLIP-ConvNeXt + DINOv2 encoders and zoom views.
  model.vision = ConfigDict()
  model.vision.image_size = 64 if is_tiny else 448  # side of every view (S in batch.py)
  model.vision.max_tiles = 2 if is_tiny else 4  # zoom tiles besides the global view
  model.vision.token_grid = 4 if is_tiny else 16  # image tokens per view = token_grid**2
  # Filled by the visual-prompt issue (4): spatial-aware encoder and integration block.
  model.prompt = ConfigDict()
  model.prompt.max_prompts = 2 if is_tiny else 4  # P in batch.py
  model.prompt.map_size = 32 if is_tiny else 224  # M: side of a rasterised prompt map
  model.prompt.tokens_per_prompt = 4 if is_tiny else 8  # K: LLM tokens per visual prompt
  # Filled by the pixel-perception issue (5): SAM-style prompt encoder and mask decoder.
  model.pixel = ConfigDict()
  model.pixel.max_seg = 2 if is_tiny else 3  # Q in batch.py: [SEG] tokens per example

  config.data = ConfigDict()
  config.data.max_length = 256 if is_tiny else 2048

  train = config.train = ConfigDict()
  train.batch_size = 8 if is_tiny else 64
  train.steps = 300 if is_tiny else 10000
  train.learning_rate = 3e-3 if is_tiny else 2e-5
  train.warmup_steps = 20 if is_tiny else 300
  train.weight_decay = 0.0
  train.grad_clip_norm = 1.0
  train.log_every_steps = 10

  # Axes ('data', 'fsdp', 'tensor'); one -1 fills the remaining devices.
  config.mesh = ConfigDict()
  config.mesh.shape = (1, -1, 1)
  config.mesh.axes = ("data", "fsdp", "tensor")

  config.checkpoint = ConfigDict()
  config.checkpoint.every_steps = 100 if is_tiny else 1000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True
  return config
