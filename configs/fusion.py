"""EarthGPT-X one-stage fusion training config.

Usage: `--config=configs/fusion.py:PRESET`, PRESET in {paper, paper13b, gpu1b, tiny}; `paper` is
the default. Every size used by a module lives here; modules hold no size literals.
"""

import ml_collections

ConfigDict = ml_collections.ConfigDict
placeholder = ml_collections.config_dict.placeholder


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
  if preset == "gpu1b":  # ~0.85B LLaMA (TinyLlama-like, 16 layers): one-GPU MFU benchmark
    return dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16,
                num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=4096)
  raise ValueError(f"config preset: unknown value {preset!r}; expected paper, paper13b, gpu1b "
                   f"or tiny")


def _gpu1b(config: ConfigDict) -> None:
  """The gpu1b preset (benchmarks/gpu_step.py): the paper's layout with encoders scaled down to
  ConvNeXt-B, DINOv2 ViT-B/14 and SAM ViT-B (~1.1B parameters in all), bf16 compute, remat.
  Trains everything (no frozen groups) so the step's FLOPs are the full model's."""
  vision = config.model.vision
  vision.convnext.dims = (128, 256, 512, 1024)
  vision.dino.update(hidden_size=768, num_layers=12, num_heads=12)
  config.model.prompt.embed_dim = 768
  config.model.prompt.fusion_heads = 12
  config.model.prompt.fusion_mlp_dim = 3072
  config.model.pixel.sam_vit.update(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
                                    global_attn_indexes=(2, 5, 8, 11))
  config.train.batch_size = 8
  config.train.frozen_patterns = ()


def _pixel(pixel: ConfigDict, is_tiny: bool) -> None:
  """Pixel perception (issue 5): [SEG] -> SAM prompt -> two-way mask decoder (LISA recipe)."""
  # 'sam': SAM ViT over the global view (as LISA); 'mixed': the mixed encoders' dense map,
  # projected to the decoder width (no extra image encoder).
  pixel.image_encoder = "sam"
  pixel.dtype = "float32" if is_tiny else "bfloat16"
  pixel.param_dtype = "float32"
  pixel.ce_weight = 1.0
  pixel.bce_weight = 2.0
  pixel.dice_weight = 0.5
  pixel.mask_threshold = 0.0  # logit threshold for binary masks (SAM's)
  # Local HF SamModel folder (safetensors); its config.json replaces the sizes below
  # (pretrained.resolve_config, one log line per changed field).
  pixel.pretrained_path = None
  pixel.decoder = ConfigDict(dict(  # SAM's mask decoder is the same for ViT-B/L/H
      hidden_size=32 if is_tiny else 256, num_layers=2, num_heads=2 if is_tiny else 8,
      mlp_dim=64 if is_tiny else 2048, attention_downsample_rate=2, num_multimask_outputs=3,
      iou_head_depth=3, iou_head_hidden_dim=32 if is_tiny else 256,
      mask_input_channels=16, layer_norm_eps=1e-6, attention_impl="xla"))
  pixel.sam_vit = ConfigDict(dict(  # paper: SAM ViT-H
      image_size=64 if is_tiny else 1024, patch_size=8 if is_tiny else 16,
      hidden_size=32 if is_tiny else 1280, num_layers=2 if is_tiny else 32,
      num_heads=2 if is_tiny else 16, mlp_dim=64 if is_tiny else 5120,
      window_size=4 if is_tiny else 14, global_attn_indexes=(1,) if is_tiny else (7, 15, 23, 31),
      layer_norm_eps=1e-6, qkv_bias=True, attention_impl="xla",
      pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225)))  # of [0, 1] pixels


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
  llm.remat_policy = "nothing_saveable"  # a zero-argument jax.checkpoint_policies name
  llm.scan_layers = not is_tiny
  llm.initializer_range = 0.02  # std of the normal init (HF LlamaConfig.initializer_range)
  llm.attention_impl = "xla"  # xla | cudnn | pallas | auto (models/attention.py)
  llm.pretrained_path = placeholder(str)  # local HF LlamaForCausalLM folder
  llm.tokenizer_path = placeholder(str)  # local HF tokenizer folder; None -> project tokenizer for tiny

  # Ids of the template's special tokens; the trainer fills them from the tokenizer
  # (earthgptx_jax/tokenizer.py) and saves them with the run's config.
  model.token_ids = ConfigDict({name: placeholder(int) for name in (
      "bos", "eos", "pad", "image_patch", "vp_patch", "seg", "box")})

  # Mixed CLIP-ConvNeXt + DINOv2 encoders and zoom views (models/vision.py).
  model.vision = ConfigDict()
  model.vision.image_size = 64 if is_tiny else 448  # side of every view (S in batch.py)
  model.vision.max_tiles = 2 if is_tiny else 4  # zoom tiles besides the global view
  model.vision.token_grid = 4 if is_tiny else 16  # image tokens per view = token_grid**2
  model.vision.dtype = "float32" if is_tiny else "bfloat16"  # compute dtype
  model.vision.param_dtype = "float32"
  model.vision.remat = not is_tiny
  model.vision.attention_impl = "xla"  # DINOv2 attention: xla | cudnn | auto
  # Image tokens = both encoders' maps resized to token_grid and concatenated on channels; the
  # dense map for the pixel decoder (global view only) comes from `dense_source`:
  # "convnext" (stage `dense_stage`), "dino" (patch grid) or "mixed" (the token grid).
  model.vision.convnext_stage = -1  # ConvNeXt stage feeding the image tokens
  # DINOv2 tokens feeding them: None = after the final norm; k = HF hidden_states[k].
  model.vision.dino_layer = placeholder(int)
  model.vision.dense_source = "convnext"
  model.vision.dense_stage = 2  # stride 16: 28x28 at 448
  # CLIP-ConvNeXt trunk (open_clip convnext_large_d_320 = timm convnext_large).
  model.vision.convnext = ConfigDict(dict(
      depths=(1, 1, 2, 1) if is_tiny else (3, 3, 27, 3),
      dims=(8, 16, 24, 32) if is_tiny else (192, 384, 768, 1536),
      in_channels=3, patch_size=4, kernel_size=7, mlp_ratio=4, layer_norm_eps=1e-6,
      head_norm_eps=1e-6,  # pooled-feature norm (timm head.norm; HF ConvNext uses 1e-12)
      depthwise_impl="auto",  # 7x7 depthwise conv: auto | xla | shift (see models/convnext.py)
      layer_scale_init=1e-6,
      image_mean=(0.48145466, 0.4578275, 0.40821073),  # OpenAI CLIP
      image_std=(0.26862954, 0.26130258, 0.27577711),
      dtype=model.vision.get_ref("dtype"), param_dtype=model.vision.get_ref("param_dtype"),
      remat=model.vision.get_ref("remat"),
      pretrained_path=placeholder(str)))  # open_clip/timm state dict or HF ConvNext folder
  # DINOv2 ViT (HF Dinov2Model layout), ViT-L/14 pretrained at 518.
  model.vision.dino = ConfigDict(dict(
      hidden_size=16 if is_tiny else 1024, num_layers=2 if is_tiny else 24,
      num_heads=2 if is_tiny else 16, mlp_ratio=4.0, patch_size=8 if is_tiny else 14,
      in_channels=3, pretrain_image_size=32 if is_tiny else 518, num_register_tokens=0,
      layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False, qkv_bias=True,
      pos_interp_antialias=False,  # True for HF Dinov2WithRegisters
      use_mask_token=True, initializer_range=0.02,
      image_mean=(0.485, 0.456, 0.406),  # ImageNet
      image_std=(0.229, 0.224, 0.225),
      dtype=model.vision.get_ref("dtype"), param_dtype=model.vision.get_ref("param_dtype"),
      remat=model.vision.get_ref("remat"), attention_impl=model.vision.get_ref("attention_impl"),
      pretrained_path=placeholder(str)))  # HF Dinov2 folder
  # Per-modality preprocessing (data_pipelines/preprocess.py).
  model.vision.preprocess = ConfigDict(dict(
      optical_bands=(0, 1, 2), optical_percentiles=(1.0, 99.0), sar_scale="amplitude",
      sar_percentiles=(1.0, 99.0), infrared_percentiles=(1.0, 99.9)))
  # Filled by the visual-prompt issue (4): spatial-aware encoder and integration block.
  model.prompt = ConfigDict()
  model.prompt.max_prompts = 2 if is_tiny else 4  # P in batch.py
  model.prompt.map_size = 32 if is_tiny else 224  # M: side of a rasterised prompt map
  model.prompt.tokens_per_prompt = 4 if is_tiny else 8  # K: LLM tokens per visual prompt
  model.prompt.embed_dim = 32 if is_tiny else 1024  # D: prompt tokens and integration block
  model.prompt.fourier_features = 8 if is_tiny else 128  # SAM random-Fourier frequencies
  model.prompt.fourier_scale = 1.0  # std of those frequencies (SAM's default)
  model.prompt.fourier_seed = 0  # they are fixed (not trained), drawn from this seed
  model.prompt.pool_heads = 2 if is_tiny else 6  # K-query attention pooling over SAE tokens
  model.prompt.pool_mlp_dim = 64 if is_tiny else 1536
  model.prompt.fusion_heads = 2 if is_tiny else 16  # integration block (models/fusion.py)
  model.prompt.fusion_mlp_dim = 64 if is_tiny else 4096
  model.prompt.layer_norm_eps = 1e-6
  model.prompt.initializer_range = 0.02
  model.prompt.dtype = "float32" if is_tiny else "bfloat16"  # compute dtype
  model.prompt.param_dtype = "float32"
  model.prompt.remat = not is_tiny
  model.prompt.attention_impl = "xla"  # xla | cudnn | auto
  # Spatial-aware encoder: models/vit.py's ViT over one 1-channel prompt map, random init
  # (paper: a small ViT; here ViT-S/16-shaped, 6 blocks).
  model.prompt.sae = ConfigDict(dict(
      hidden_size=16 if is_tiny else 384, num_layers=2 if is_tiny else 6,
      num_heads=2 if is_tiny else 6, mlp_ratio=4.0, patch_size=8 if is_tiny else 16,
      in_channels=1, pretrain_image_size=model.prompt.get_ref("map_size"),
      num_register_tokens=0, layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False,
      qkv_bias=True, pos_interp_antialias=False, use_mask_token=False,
      dtype=model.prompt.get_ref("dtype"), param_dtype=model.prompt.get_ref("param_dtype"),
      initializer_range=model.prompt.get_ref("initializer_range"),
      remat=model.prompt.get_ref("remat"),
      attention_impl=model.prompt.get_ref("attention_impl")))
  # Region features (models/regions.py): RoIAlign in each prompt's box over global-view maps,
  # added to the prompt's tokens. tiny's random-init encoders carry little yet, so it also reads
  # the pixels; the pretrained presets read two ConvNeXt stages (strides 8 and 16).
  model.prompt.region = ConfigDict(dict(
      sources=("pixels", "convnext_0") if is_tiny else ("convnext_1", "convnext_2"),
      bins=8 if is_tiny else 4,  # samples per side of the box
      min_size=0.1,  # boxes widened to >= this fraction of the view (a point is a 0-size box)
      mlp_dim=64 if is_tiny else 1024))
  # Filled by the pixel-perception issue (5): SAM-style prompt encoder and mask decoder.
  model.pixel = ConfigDict()
  model.pixel.max_seg = 2 if is_tiny else 3  # Q in batch.py: [SEG] tokens per example
  _pixel(model.pixel, is_tiny)

  # Box head (models/box_head.py): answer boxes become one [BOX] token each, and the hidden
  # state that predicts it queries a global-view ConvNeXt map for the box (L1 + gIoU). tiny:
  # spelled out as text, box grounding stayed at Acc@0.5 0.0 even trained alone (README); the
  # paper writes boxes as text, so its presets keep the head off.
  model.box = ConfigDict(dict(
      head=is_tiny,
      max_boxes=10,  # Qb in batch.py: [BOX] tokens per example; = schema.MAX_ANSWER_BOXES
      feature_stage=1,  # ConvNeXt stage the head reads (stride 8: 8x8 cells at 64 px)
      dim=32 if is_tiny else 256,  # query / key width of the head's attention
      l1_weight=1.0, giou_weight=1.0,
      cell_weight=1.0,  # CE of the head's attention against the target centre's cell
      init_size=0.1,  # side of a new head's boxes, a fraction of the view
      layer_norm_eps=1e-6, initializer_range=0.02,
      dtype="float32" if is_tiny else "bfloat16", param_dtype="float32"))

  config.data = ConfigDict()
  config.data.max_length = 256 if is_tiny else 2048
  # Data pipeline (issue 6; data_pipelines/README.md). TFDS ArrayRecord datasets live under
  # data_dir; synthetic_rs is generated there on first use.
  data = config.data
  data.data_dir = "~/.cache/earthgptx_jax/data"
  data.train_split = "train"
  data.eval_split = "validation"
  # Mixture components: name -> (TFDS dataset, weight). Real sources are built first with
  # `python -m data_pipelines.build --dataset NAME --manual_dir DIR --data_dir DIR` and added
  # e.g. as data.sources.dior_rsvg = ConfigDict(dict(dataset="dior_rsvg", weight=1.0)).
  data.sources = ConfigDict({
      f"synthetic_{m}": ConfigDict(dict(dataset=f"synthetic_rs/{m}", weight=1.0))
      for m in ("optical", "sar", "infrared")})
  # Tasks of the alignment stage (train.alignment_steps; pipeline.StagedBatchIterator).
  data.alignment_tasks = ("scene_classification", "image_caption", "referring_segmentation")
  data.num_workers = 0 if is_tiny else 8  # grain mp_prefetch worker processes; 0: in-process
  data.worker_buffer_size = 2  # batches buffered per worker
  data.max_bad_fraction = 0.01  # abort when more records than this are unusable
  data.bad_check_min_records = 200  # ... once at least this many records were read
  data.synthetic = ConfigDict(dict(
      seed=0,
      num_train=1000 if is_tiny else 5000,  # records per modality (paper: ~0.13 s each)
      num_eval=100 if is_tiny else 1000,
      min_size=80 if is_tiny else 256,  # image sides in pixels (aspect ratio varies)
      max_size=112 if is_tiny else 640,
      num_land_cover=4 if is_tiny else 6,
      num_object_classes=5,
      max_objects=4 if is_tiny else 8,
  ))

  train = config.train = ConfigDict()
  train.batch_size = 8 if is_tiny else 64
  # tiny: 3e-3 learned the text side but left scene / referring / mask accuracy at chance; at
  # 1e-3 the answers start to depend on the image (masks from ~500 steps on).
  train.steps = 1000 if is_tiny else 10000
  train.learning_rate = 1e-3 if is_tiny else 2e-5
  train.warmup_steps = 20 if is_tiny else 300
  # The first alignment_steps batches hold only data.alignment_tasks (image-level questions
  # and masks). tiny: without it, land cover stayed at chance after 800 steps of the full
  # mixture (0.21, chance 0.25); with 200 steps and the region features it did too (0.21),
  # with 300 it reached 0.54; with referring classification added to the stage's tasks it
  # stayed at chance again (0.21); with box grounding added, captions collapsed (CIDEr 0.06) and
  # land cover fell to 0.28. The paper trains in one stage from pretrained encoders.
  train.alignment_steps = 300 if is_tiny else 0
  train.weight_decay = 0.0
  train.grad_clip_norm = 1.0
  # Clip + AdamW over one flat vector per group instead of per leaf (optim.py): the same
  # arithmetic; tiny's step compiles in ~71 s instead of ~85 s on one CPU device. The flat
  # moments are not sharded, so presets (and multi-device meshes) that shard keep it off.
  train.flat_optimizer = is_tiny
  train.log_every_steps = 10
  train.grad_accum_steps = 1
  train.eval_every_steps = 0 if is_tiny else 2000  # 0: evaluate only at the end
  train.eval_examples = 300 if is_tiny else 1000  # tiny: the whole held-out split, ~1 min
  # XLA's persistent compilation cache: resumed and repeated runs reuse compiled steps.
  train.compilation_cache_dir = "~/.cache/earthgptx_jax/jax_cache"
  train.peak_flops = placeholder(float)  # per-job FLOP/s for MFU; None measures a matmul peak at start
  # Regexes over '/'-joined paths of {"params": model params, "lora": adapters}. The paper
  # trains the new modules and the LLM (attention; embeddings for the new tokens) with the
  # pretrained vision encoders frozen; tiny trains everything (its encoders are random).
  train.frozen_patterns = () if is_tiny else (r"^params/vision/", r"^params/llm/.*/mlp/")
  train.lora = ConfigDict()
  train.lora.rank = 0  # 0 disables LoRA
  train.lora.alpha = 16.0
  train.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")

  # Axes ('data', 'fsdp', 'tensor'); one -1 fills the remaining devices.
  config.mesh = ConfigDict()
  config.mesh.shape = (1, -1, 1)
  config.mesh.axes = ("data", "fsdp", "tensor")

  config.checkpoint = ConfigDict()
  config.checkpoint.every_steps = 100 if is_tiny else 1000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True
  config.checkpoint.best_metric = placeholder(str)  # e.g. "score"; keeps the best checkpoint by eval
  config.checkpoint.best_mode = "max"
  config.checkpoint.keep_best = 1

  # Multi-host: enabled=True calls jax.distributed.initialize with the fields that are set
  # (all None: auto-detection on Cloud TPU / SLURM / Kubernetes).
  config.distributed = ConfigDict()
  config.distributed.enabled = False
  config.distributed.coordinator_address = placeholder(str)
  config.distributed.num_processes = placeholder(int)
  config.distributed.process_id = placeholder(int)
  config.distributed.local_device_ids = placeholder(tuple)
  if preset == "gpu1b":
    _gpu1b(config)
  return config
