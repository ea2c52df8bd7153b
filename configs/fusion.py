"""EarthGPT-X one-stage fusion training config.

Usage: `--config=configs/fusion.py:PRESET`, PRESET in {paper, paper13b, gpu1b, tiny}; `paper` is
the default. `base_config()` holds the paper's values; every other preset is a dict of overrides
(`PRESETS`: dotted keys, a dict value sets the fields it names in that sub-config) applied over
it by `override`. Every size used by a module lives here; modules hold no size literals.
"""

from collections.abc import Mapping
from typing import Any

import ml_collections

from earthgptx_jax import tasks

ConfigDict = ml_collections.ConfigDict
placeholder = ml_collections.config_dict.placeholder
# The train.frozen_patterns entry that freezes SAM's ViT image encoder (every param under it).
FROZEN_SAM_ENCODER = r"^params/pixel/vision_encoder/"


def _llm() -> ConfigDict:
  """LLaMA-2-7B (models/llama.py)."""
  llm = ConfigDict(dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                        max_position_embeddings=4096))
  llm.rms_norm_eps = 1e-5
  llm.rope_theta = 10000.0
  # None, or HF-style dict, e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
  # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}.
  llm.rope_scaling = None
  llm.tie_word_embeddings = False
  llm.dtype = "bfloat16"  # compute dtype
  llm.param_dtype = "float32"
  llm.remat = True
  llm.remat_policy = "nothing_saveable"  # a zero-argument jax.checkpoint_policies name
  llm.scan_layers = True
  llm.initializer_range = 0.02  # std of the normal init (HF LlamaConfig.initializer_range)
  llm.attention_impl = "xla"  # xla | cudnn | pallas | auto (models/attention.py)
  # Train CE over chunks of this many positions, never forming [B, L, V] logits; 0: plain CE.
  llm.ce_chunk_size = 256
  llm.pretrained_path = placeholder(str)  # local HF LlamaForCausalLM folder
  # Local HF tokenizer folder; None -> the project's tokenizer, trained on the synthetic text.
  llm.tokenizer_path = placeholder(str)
  return llm


def _vision() -> ConfigDict:
  """Mixed CLIP-ConvNeXt + DINOv2 encoders and zoom views (models/vision.py)."""
  vision = ConfigDict()
  vision.image_size = 448  # side of every view (S in batch.py)
  vision.max_tiles = 4  # zoom tiles besides the global view
  vision.token_grid = 16  # image tokens per view = token_grid**2
  vision.dtype = "bfloat16"  # compute dtype
  vision.param_dtype = "float32"
  vision.remat = True
  vision.attention_impl = "xla"  # DINOv2 attention: xla | cudnn | auto
  # Image tokens = both encoders' maps resized to token_grid and concatenated on channels; the
  # dense map for the pixel decoder (global view only) comes from `dense_source`:
  # "convnext" (stage `dense_stage`), "dino" (patch grid) or "mixed" (the token grid).
  vision.convnext_stage = -1  # ConvNeXt stage feeding the image tokens
  # DINOv2 tokens feeding them: None = after the final norm; k = HF hidden_states[k].
  vision.dino_layer = placeholder(int)
  vision.dense_source = "convnext"
  vision.dense_stage = 2  # stride 16: 28x28 at 448
  # CLIP-ConvNeXt trunk (open_clip convnext_large_d_320 = timm convnext_large).
  vision.convnext = ConfigDict(dict(
      depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536),
      in_channels=3, patch_size=4, kernel_size=7, mlp_ratio=4, layer_norm_eps=1e-6,
      stem_type="patch",  # or timm's overlap stems: overlap | overlap_tiered | overlap_act
      head_norm_eps=1e-6,  # pooled-feature norm (timm head.norm; HF ConvNext uses 1e-12)
      depthwise_impl="auto",  # 7x7 depthwise conv: auto | xla | shift (see models/convnext.py)
      layer_scale_init=1e-6,
      image_mean=(0.48145466, 0.4578275, 0.40821073),  # OpenAI CLIP
      image_std=(0.26862954, 0.26130258, 0.27577711),
      dtype=vision.get_ref("dtype"), param_dtype=vision.get_ref("param_dtype"),
      remat=vision.get_ref("remat"),
      pretrained_path=placeholder(str)))  # open_clip/timm state dict or HF ConvNext folder
  # DINOv2 ViT (HF Dinov2Model layout), ViT-L/14 pretrained at 518.
  vision.dino = ConfigDict(dict(
      hidden_size=1024, num_layers=24, num_heads=16, mlp_ratio=4.0, patch_size=14,
      in_channels=3, pretrain_image_size=518, num_register_tokens=0,
      layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False, qkv_bias=True,
      pos_interp_antialias=False,  # True for HF Dinov2WithRegisters
      use_mask_token=True, initializer_range=0.02,
      image_mean=(0.485, 0.456, 0.406),  # ImageNet
      image_std=(0.229, 0.224, 0.225),
      dtype=vision.get_ref("dtype"), param_dtype=vision.get_ref("param_dtype"),
      remat=vision.get_ref("remat"), attention_impl=vision.get_ref("attention_impl"),
      pretrained_path=placeholder(str)))  # HF Dinov2 folder
  # Per-modality preprocessing (data_pipelines/preprocess.py).
  vision.preprocess = ConfigDict(dict(
      optical_bands=(0, 1, 2), optical_percentiles=(1.0, 99.0), sar_scale="amplitude",
      sar_percentiles=(1.0, 99.0), infrared_percentiles=(1.0, 99.9)))
  return vision


def _prompt() -> ConfigDict:
  """Visual prompts: spatial-aware encoder (models/prompts.py), region features
  (models/regions.py) and the integration block (models/integration.py)."""
  prompt = ConfigDict()
  prompt.max_prompts = 4  # P in batch.py
  prompt.map_size = 224  # M: side of a rasterised prompt map
  prompt.tokens_per_prompt = 8  # K: LLM tokens per visual prompt
  prompt.embed_dim = 1024  # D: prompt tokens and integration block
  prompt.fourier_features = 128  # SAM random-Fourier frequencies
  prompt.fourier_scale = 1.0  # std of those frequencies (SAM's default)
  prompt.fourier_seed = 0  # they are fixed (not trained), drawn from this seed
  prompt.pool_heads = 6  # K-query attention pooling over SAE tokens
  prompt.pool_mlp_dim = 1536
  prompt.fusion_heads = 16  # integration block (models/integration.py)
  prompt.fusion_mlp_dim = 4096
  prompt.layer_norm_eps = 1e-6
  prompt.initializer_range = 0.02
  prompt.dtype = "bfloat16"  # compute dtype
  prompt.param_dtype = "float32"
  prompt.remat = True
  prompt.attention_impl = "xla"  # xla | cudnn | auto
  # Spatial-aware encoder: models/vit.py's ViT over one 1-channel prompt map, random init
  # (paper: a small ViT; here ViT-S/16-shaped, 6 blocks).
  prompt.sae = ConfigDict(dict(
      hidden_size=384, num_layers=6, num_heads=6, mlp_ratio=4.0, patch_size=16,
      in_channels=1, pretrain_image_size=prompt.get_ref("map_size"),
      num_register_tokens=0, layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False,
      qkv_bias=True, pos_interp_antialias=False, use_mask_token=False,
      dtype=prompt.get_ref("dtype"), param_dtype=prompt.get_ref("param_dtype"),
      initializer_range=prompt.get_ref("initializer_range"),
      remat=prompt.get_ref("remat"),
      attention_impl=prompt.get_ref("attention_impl")))
  # Region features: RoIAlign in each prompt's box over global-view maps ("pixels" or
  # "convnext_<stage>"), added to the prompt's tokens; here two ConvNeXt stages (strides 8, 16).
  prompt.region = ConfigDict(dict(
      sources=("convnext_1", "convnext_2"),
      bins=4,  # samples per side of the box
      min_size=0.1,  # boxes widened to >= this fraction of the view (a point is a 0-size box)
      mlp_dim=1024,
      box_features=False))  # the box's centre and sides also enter the MLP (regions.py)
  return prompt


def _pixel() -> ConfigDict:
  """Pixel perception: [SEG] -> SAM prompt -> two-way mask decoder (LISA recipe;
  models/pixel.py)."""
  pixel = ConfigDict()
  pixel.max_seg = 3  # Q in batch.py: [SEG] tokens per example
  # 'sam': SAM ViT over the global view (as LISA); 'mixed': the mixed encoders' dense map,
  # projected to the decoder width (no extra image encoder).
  pixel.image_encoder = "sam"
  pixel.dtype = "bfloat16"
  pixel.param_dtype = "float32"
  pixel.mask_threshold = 0.0  # logit threshold for binary masks (SAM's)
  # Local HF SamModel folder (safetensors); its config.json replaces the sizes below
  # (pretrained.resolve_config, one log line per changed field).
  pixel.pretrained_path = None
  pixel.decoder = ConfigDict(dict(  # SAM's mask decoder is the same for ViT-B/L/H
      hidden_size=256, num_layers=2, num_heads=8, mlp_dim=2048, attention_downsample_rate=2,
      num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
      mask_input_channels=16, layer_norm_eps=1e-6, attention_impl="xla"))
  pixel.sam_vit = ConfigDict(dict(  # SAM ViT-H
      image_size=1024, patch_size=16, hidden_size=1280, num_layers=32, num_heads=16,
      mlp_dim=5120, window_size=14, global_attn_indexes=(7, 15, 23, 31),
      layer_norm_eps=1e-6, qkv_bias=True,
      # auto: cuDNN on a GPU in bf16 (no float32 [B, N, T, S] scores in HBM), else xla.
      attention_impl="auto",
      remat=True,  # recompute each layer in the backward pass (~15 GB/image at 1024 px, SAM-H)
      pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225)))  # of [0, 1] pixels
  return pixel


def _box() -> ConfigDict:
  """Box head (models/box_head.py): with `head`, answer boxes become one [BOX] token each, and
  the hidden state that predicts it queries a global-view ConvNeXt map for the box (L1 + gIoU +
  the centre cell's CE). Off, boxes are written as text, as the paper does."""
  return ConfigDict(dict(
      head=False,
      max_boxes=10,  # Qb in batch.py: [BOX] tokens per example; = schema.MAX_ANSWER_BOXES
      feature_stage=1,  # ConvNeXt stage the head reads (stride 8)
      dim=256,  # query / key width of the head's attention
      init_size=0.1,  # side of a new head's boxes, a fraction of the view
      layer_norm_eps=1e-6, initializer_range=0.02,
      dtype="bfloat16", param_dtype="float32"))


def _data() -> ConfigDict:
  """Data pipeline (data_pipelines/README.md): TFDS ArrayRecord datasets under data_dir;
  synthetic_rs is generated there on first use."""
  data = ConfigDict()
  data.max_length = 2048
  data.data_dir = "~/.cache/earthgptx_jax/data"
  data.train_split = "train"
  data.eval_split = "validation"
  # Mixture components: name -> (TFDS dataset, weight). Real sources are built first with
  # `python -m data_pipelines.build --dataset NAME --manual_dir DIR --data_dir DIR` and added
  # e.g. as data.sources.dior_rsvg = ConfigDict(dict(dataset="dior_rsvg", weight=1.0)).
  data.sources = ConfigDict({
      f"synthetic_{m}": ConfigDict(dict(dataset=f"synthetic_rs/{m}", weight=1.0))
      for m in ("optical", "sar", "infrared")})
  # Mix by (source, task) instead of by source: each task gets its task_weights share of the
  # batches whatever its share of the stored records (pipeline.task_components).
  data.mix_tasks = False
  data.task_weights = ConfigDict({task: 1.0 for task in tasks.NAMES})
  # The mixture is a fixed interleave of its components. > 1: each window of this many examples
  # is shuffled (same proportions). By (source, task) the interleave gives every batch its
  # share of each task but fills it from one sensor; shuffled windows mix the sensors and vary
  # the tasks of a batch, and the tiny main job learned less (score 0.658 against 0.771,
  # docs/experiments.md, E6 / E7).
  data.mix_window = 0
  # Tasks of the alignment stage (train.alignment_steps; pipeline.StagedBatchIterator).
  data.alignment_tasks = ("scene_classification", "image_caption", "referring_segmentation")
  # Train-data shards, each its own record stream and row block of the global batch; a process
  # loads the shards of the rows its devices hold. None: one per distinct row block (one per
  # process, or fewer when processes share rows). Fixed, the batches do not depend on how many
  # processes run (training.DataShards).
  data.shards = placeholder(int)
  data.num_workers = 8  # grain mp_prefetch worker processes; 0: in-process
  data.worker_buffer_size = 2  # batches buffered per worker
  data.max_bad_fraction = 0.01  # abort when more records than this are unusable
  data.bad_check_min_records = 200  # ... once at least this many records were read
  data.synthetic = ConfigDict(dict(
      seed=0,
      num_train=5000,  # records per modality (~0.13 s each to generate at these sizes)
      num_eval=1000,
      min_size=256,  # image sides in pixels (aspect ratio varies)
      max_size=640,
      num_land_cover=6,
      num_object_classes=5,
      max_objects=8,
  ))
  return data


def _train() -> ConfigDict:
  train = ConfigDict()
  train.batch_size = 64
  train.steps = 10000
  train.learning_rate = 2e-5
  train.warmup_steps = 300
  # How the answer CE averages (losses.answer_cross_entropy): "token" over all answer tokens
  # (LISA's), "example" over examples, so a one-word answer weighs as much as a caption.
  train.answer_ce = "token"
  # The first alignment_steps batches hold only data.alignment_tasks (image-level questions and
  # masks); 0: one stage, as the paper trains from pretrained encoders.
  train.alignment_steps = 0
  train.weight_decay = 0.0
  train.grad_clip_norm = 1.0
  # Clip + AdamW over one flat vector per group instead of per leaf (optim.py): the same
  # arithmetic in far fewer kernels (faster to compile on CPU). The flat moments are not
  # sharded, so presets (and multi-device meshes) that shard keep it off.
  train.flat_optimizer = False
  train.log_every_steps = 10
  train.grad_accum_steps = 1
  train.eval_every_steps = 2000  # 0: evaluate only at the end
  train.eval_examples = 1000
  # At most this many of them per task (pipeline.make_eval_iterator); None: no cap.
  train.eval_examples_per_task = placeholder(int)
  # XLA's persistent compilation cache: resumed and repeated runs reuse compiled steps.
  train.compilation_cache_dir = "~/.cache/earthgptx_jax/jax_cache"
  # Per-job FLOP/s for MFU; None measures a matmul peak at start.
  train.peak_flops = placeholder(float)
  # Regexes over '/'-joined paths of {"params": model params, "lora": adapters}. The paper
  # trains the new modules and the LLM (attention; embeddings for the new tokens) with the
  # pretrained vision encoders frozen, and (as LISA) SAM's image encoder: drop
  # FROZEN_SAM_ENCODER from a preset's tuple to train it.
  train.frozen_patterns = (r"^params/vision/", r"^params/llm/.*/mlp/", FROZEN_SAM_ENCODER)
  train.lora = ConfigDict()
  train.lora.rank = 0  # 0 disables LoRA
  train.lora.alpha = 16.0
  train.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
  return train


def base_config() -> ConfigDict:
  """The paper's configuration (LLaMA-2-7B, CLIP-ConvNeXt-L + DINOv2-L, SAM ViT-H)."""
  config = ConfigDict()
  config.preset = "paper"
  config.seed = 0

  model = config.model = ConfigDict()
  model.llm = _llm()
  # Ids of the template's special tokens; the trainer fills them from the tokenizer
  # (earthgptx_jax/tokenizer.py) and saves them with the run's config.
  model.token_ids = ConfigDict({name: placeholder(int) for name in (
      "bos", "eos", "pad", "image_patch", "vp_patch", "seg", "box")})
  model.vision = _vision()
  model.prompt = _prompt()
  model.pixel = _pixel()
  model.box = _box()

  # Weights of the training loss terms (losses.py, trainer.compute_losses); the names are also
  # the metrics the train step logs. Answer-token CE, mask BCE and Dice (LISA's weights), the box
  # head's L1 and gIoU (DETR's losses) and the CE of its attention against the cell that holds
  # the target box's centre; the box terms are 0 without the head.
  config.loss = ConfigDict(dict(ce=1.0, mask_bce=2.0, mask_dice=0.5, box_l1=1.0, box_giou=1.0,
                                box_cell=1.0))

  config.data = _data()
  config.train = _train()

  # Axes ('data', 'fsdp', 'tensor'); one -1 fills the remaining devices.
  config.mesh = ConfigDict()
  config.mesh.shape = (1, -1, 1)
  config.mesh.axes = ("data", "fsdp", "tensor")
  # Slices (TPU) or processes (GPU/CPU) per axis, e.g. (2, 1, 1): `shape` is then the mesh in
  # one slice (sharding.make_mesh); None: one mesh over all devices. README "Multi-host".
  config.mesh.dcn_shape = placeholder(tuple)

  config.checkpoint = ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True
  # An eval metric, e.g. "score": keeps the best checkpoint by it.
  config.checkpoint.best_metric = placeholder(str)
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
  return config


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # LLaMA-2-13B.
    "paper13b": {
        "model.llm": dict(hidden_size=5120, intermediate_size=13824, num_layers=40,
                          num_heads=40, num_kv_heads=40),
    },
    # One-GPU MFU benchmark (benchmarks/gpu_step.py): the paper's layout with a ~0.85B LLaMA
    # (TinyLlama-like, 16 layers) and encoders scaled down to ConvNeXt-B, DINOv2 ViT-B/14 and
    # SAM ViT-B (~1.1B parameters in all). Trains everything (no frozen groups) so the step's
    # FLOPs are the full model's.
    "gpu1b": {
        "model.llm": dict(hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=32,
                          num_kv_heads=8, head_dim=64),
        "model.vision.convnext.dims": (128, 256, 512, 1024),
        "model.vision.dino": dict(hidden_size=768, num_layers=12, num_heads=12),
        "model.prompt": dict(embed_dim=768, fusion_heads=12, fusion_mlp_dim=3072),
        "model.pixel.sam_vit": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
                                    global_attn_indexes=(2, 5, 8, 11)),
        "train": dict(batch_size=8, frozen_patterns=()),
    },
    # A model small enough to train on a CPU in minutes: random-init encoders, float32, no
    # remat; every module and task of the paper's at toy sizes. docs/experiments.md records how
    # its recipe was chosen.
    "tiny": {
        "model.llm": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
                          rms_norm_eps=1e-6, dtype="float32", remat=False, scan_layers=False),
        "model.vision": dict(
            image_size=64, max_tiles=2, token_grid=4, dtype="float32", remat=False,
            convnext=dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32)),
            dino=dict(hidden_size=16, num_layers=2, num_heads=2, patch_size=8,
                      pretrain_image_size=32)),
        "model.prompt": dict(
            max_prompts=2,  # P in batch.py
            map_size=32, tokens_per_prompt=4, embed_dim=32, fourier_features=8, pool_heads=2,
            pool_mlp_dim=64, fusion_heads=2, fusion_mlp_dim=64, dtype="float32", remat=False,
            sae=dict(hidden_size=16, num_layers=2, num_heads=2, patch_size=8),
            # Random-init encoders carry little yet, so the region features also read the
            # pixels.
            region=dict(sources=("pixels", "convnext_0"), bins=8, mlp_dim=64)),
        "model.pixel": dict(
            max_seg=2,  # Q in batch.py
            dtype="float32",
            decoder=dict(hidden_size=32, num_heads=2, mlp_dim=64, iou_head_hidden_dim=32),
            sam_vit=dict(image_size=64, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                         mlp_dim=64, window_size=4, global_attn_indexes=(1,), remat=False)),
        # Boxes through the head: written as text, tiny did not learn box grounding.
        "model.box": dict(
            head=True, dim=32, dtype="float32"),
        "data": dict(
            max_length=256, num_workers=0,
            # Batches by task, weighted toward the tasks that need the image most
            # (docs/experiments.md).
            mix_tasks=True,
            task_weights=dict(referring_classification=1.5, relation_reasoning=1.5,
                              box_grounding=2.0),
            synthetic=dict(num_train=3000, num_eval=400, min_size=80, max_size=112,
                           num_land_cover=4, max_objects=4),
            # The prompted object's class is learned in the alignment stage: from the mixture
            # alone it stayed at the class prior (docs/experiments.md, X1-X6).
            alignment_tasks=("scene_classification", "image_caption", "referring_segmentation",
                             "referring_classification")),
        "train": dict(
            # 3200 steps since the huge-page malloc (host_memory.py) made the step ~1/3 faster;
            # training command cold 6 min 55 s at a fast hour, 13 min 54 s at a slow one (README).
            batch_size=8, steps=3200, learning_rate=1e-3, warmup_steps=20,
            # Random-init encoders need it; 800 rather than 400 learns land cover from all three
            # initialisations tried (docs/experiments.md, A1-A3).
            alignment_steps=800,
            answer_ce="sqrt",  # a caption weighs a few one-word answers, not ~16
            flat_optimizer=True, eval_every_steps=0,
            eval_examples=1000, eval_examples_per_task=110,  # >= 100 of every task
            frozen_patterns=()),  # nothing pretrained to keep
        # At weight 1 the box head's centre-cell CE gave the ConvNeXt a gradient ~47x the answer
        # CE's (docs/probes/loss_gradients.py), so the shared trunk learned boxes only; at these
        # weights every term's gradient there is of one size (docs/experiments.md, K0-M2).
        "loss": dict(box_cell=0.05, box_giou=0.25),
        "checkpoint.every_steps": 100,
    },
}


def override(config: ConfigDict, overrides: Mapping[str, Any], prefix: str = "") -> None:
  """Sets each dotted key of `overrides` in `config`; a dict value sets the fields it names in
  that sub-config. A key naming no existing field is an error (a typo would silently add one)."""
  for key, value in overrides.items():
    *parents, name = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ConfigDict) else None
    if not isinstance(node, ConfigDict) or name not in node:
      raise KeyError(f"config override: {prefix + key!r} names no field of the base config")
    if isinstance(value, Mapping):
      override(node[name], value, prefix=f"{prefix}{key}.")
    else:
      node[name] = value  # a field shared by reference (get_ref) updates everywhere it is used


def get_config(arg: str | None = None) -> ConfigDict:
  preset = arg or "paper"
  if preset not in PRESETS:
    raise ValueError(f"config preset: unknown value {preset!r}; expected paper, paper13b, gpu1b "
                     f"or tiny")
  config = base_config()
  override(config, PRESETS[preset])
  config.preset = preset
  return config
