"""The config schema: the fields every zoo task shares, plus the subtree of the run's task.

A model config file starts from `base_config(task)` (also importable as
`configs.common.base_config`, where the config files get it) and changes what it needs;
`train.py` rejects keys that are not in the schema of the config's task (a typo never silently
becomes a new field) and values of the wrong type, before anything is compiled. Field meanings
are documented inline; a task's own fields (`config.lm` for language_modeling, `config.views`
for novel_view_synthesis) are documented in its `default_config()` (zoo/tasks/).

It lives in the installed package (not in the repository's configs/ folder), so validation,
`eval.py`-style restores and the training entry point work from a wheel.
"""
import ml_collections

from zoo.training import tasks


def base_config(task: str = "classification") -> ml_collections.ConfigDict:
    """The shared fields with their defaults, `task` set, and the task's own subtree
    (`config.<Task.config_key>` = `Task.default_config()`) if it has one. An unregistered
    `task` is a ConfigError."""
    c = ml_collections.ConfigDict()

    # --- what to train -----------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # a name from zoo.list_models()
    c.model.overrides = ml_collections.ConfigDict()  # builder kwargs (num_classes, dtype, ...)
    # Attention implementation of every attention layer (kernels_pallas.attention `impl`):
    # auto (the dispatch policy, kernels_pallas/api.py DISPATCH_TABLE: our Pallas kernels on
    # GPU/TPU, XLA on CPU) | pallas (ours, always) | cudnn (GPU, plain softmax calls) | xla |
    # interpret (the GPU kernel in the Pallas interpreter: the kernel path on CPU, slow, for
    # tests and debugging). HaloNet takes auto | xla | pallas | interpret.
    c.model.attn_impl = "auto"
    # zoo.training.tasks.list_tasks(): classification | language_modeling | image_diffusion |
    # masked_image_modeling | novel_view_synthesis. Set it through base_config(task), which
    # adds the task's own subtree.
    c.task = task
    # Initial weights from a file, for fine-tuning (zoo/training/init_from.py). Used only when
    # the run starts from scratch: a workdir with a checkpoint always resumes from it.
    c.init_from = ml_collections.ConfigDict()
    c.init_from.path = ""  # .safetensors | .npz | .pth/.pt/.bin/.ckpt; "" = random init
    # a key of zoo.registry.weight_sources() ("hf:gpt2", "timm:swin_tiny_patch4_window7_224")
    # whose converter maps the file's names to ours, or "zoo" (the file uses our paths)
    c.init_from.source = ""
    c.init_from.dont_load = ()  # regexes on our variable paths that keep their fresh init
    c.init_from.overrides = ml_collections.ConfigDict()  # converter kwargs (num_heads, ...)
    c.label_smoothing = 0.0  # classification training loss only; eval reports plain CE
    # Mixup / CutMix on training batches (classification; zoo/training/mixup.py, timm's
    # semantics). Both alphas 0 = off; DeiT/Swin: mixup_alpha 0.8, cutmix_alpha 1.0.
    c.mixup = ml_collections.ConfigDict()
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.mixup.cutmix_minmax = ()  # () or (min, max) box side fractions (overrides cutmix_alpha)
    c.mixup.prob = 1.0  # probability of mixing a batch (or pair/element)
    c.mixup.switch_prob = 0.5  # probability of CutMix when both are on
    c.mixup.mode = "batch"  # batch | pair | elem

    # --- data --------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # classification: generated | image_folder | array_record | tfds
    # language_modeling: embedded_text | token_files (zoo/tasks/language_modeling.py)
    # novel_view_synthesis: generated_multiview | multiview_folder (zoo/tasks/novel_view_synthesis.py)
    c.data.source = "generated"
    c.data.path = ""  # root folder / file glob / TFDS data dir, for non-generated sources
    c.data.name = ""  # TFDS dataset name (tfds source only)
    c.data.train_split = "train"
    c.data.eval_split = "eval"
    c.data.image_size = 32  # square side the model sees
    c.data.num_classes = 10
    c.data.num_train_examples = 2048  # generated source only
    c.data.num_eval_examples = 512  # generated source only
    c.data.augment = "flip"  # none | flip | crop_flip (random-resized-crop + flip)
    # Resampling of crop/eval resizes and RandAugment's geometric ops: bilinear | bicubic |
    # random (timm: bilinear or bicubic per train image/op; eval bilinear).
    c.data.interpolation = "bilinear"
    # timm RandAugment string ("rand-m9-mstd0.5-inc1": DeiT/Swin), "" = off; after crop/flip.
    c.data.rand_augment = ""
    # torchvision ColorJitter(s, s, s) after crop/flip (timm's default 0.4 without RandAugment).
    c.data.color_jitter = 0.0
    # timm random erasing after normalisation (DeiT/Swin: prob 0.25, mode "pixel", count 1).
    c.data.random_erasing = ml_collections.ConfigDict()
    c.data.random_erasing.prob = 0.0
    c.data.random_erasing.mode = "pixel"  # pixel | rand | const
    c.data.random_erasing.min_count = 1
    c.data.random_erasing.max_count = 1
    c.data.worker_count = 0  # grain worker processes (0 = in the main process)
    # An example that cannot be read or prepared (an undecodable image, a bad record): "fail"
    # stops the run naming it; "skip" replaces a train example by the next readable one
    # (deterministically: the same batches on any host count and on resume), leaves a bad eval
    # example out of the metrics, warns with its name and counts data/bad_examples.
    c.data.on_bad_example = "fail"
    c.data.worker_buffer_size = 2
    c.data.shuffle = True
    # Image width for sources with non-square images (novel_view_synthesis's); image_size is
    # then the height. masked_image_modeling reads it too (and requires square images).
    c.data.image_width = 0  # 0 = image_size (square)

    # --- optimisation ------------------------------------------------------------------------
    c.total_steps = 100
    c.batch_size = 64  # global batch per optimizer step
    c.grad_accum_steps = 1  # micro-batches per step; batch_size must be divisible by it
    c.seed = 0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # adamw | lamb | sgd
    c.optimizer.learning_rate = 1e-3  # peak learning rate
    c.optimizer.weight_decay = 0.05
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.9  # sgd only
    c.optimizer.nesterov = False  # sgd only
    c.optimizer.grad_clip_norm = 1.0  # 0 disables clipping
    # No weight decay on 1-D parameters (biases, norm scales) nor on parameters whose path
    # ("blocks/0/attn/qkv/kernel") matches one of these regexes (embeddings, tokens, tables).
    c.optimizer.no_decay = ("pos_emb", "cls_token", "embedding", "rel_pos", "latent")
    # Parameter groups (zoo/training/optim.py): name -> ConfigDict(pattern=<regex on the
    # parameter path>, and any of freeze, name, learning_rate, weight_decay, b1, b2, eps,
    # momentum, nesterov, schedule=dict(name, warmup_steps, end_factor)). First match in name
    # order wins; unmatched parameters use the fields above.
    c.optimizer.groups = ml_collections.ConfigDict()
    # Layer-wise lr decay (BEiT/MAE fine-tuning): block i of L gets lr * layer_decay^(L - i);
    # 1.0 disables it. Blocks are found by the first regex group of layer_pattern; parameters
    # matching layer_zero (embeddings) count as layer 0.
    c.optimizer.layer_decay = 1.0
    c.optimizer.layer_pattern = r"(?:^|/)blocks/(\d+)/"
    c.optimizer.layer_zero = r"embed|cls_token|pos_emb|reg_token"

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"  # cosine | linear | constant (all after linear warmup)
    c.schedule.warmup_steps = 10
    c.schedule.end_factor = 0.0  # final lr = end_factor * learning_rate

    # Exponential moving average of the weights (zoo/training/ema.py): 0 = off; timm's usual
    # 0.9998 (DeiT: 0.99996). warmup ramps the decay as min(decay, (1+t)/(10+t)).
    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.0
    c.ema.warmup = False

    # --- precision ---------------------------------------------------------------------------
    c.precision = ml_collections.ConfigDict()
    c.precision.param_dtype = "float32"
    c.precision.compute_dtype = "float32"  # float32 | bfloat16 (the loss is always f32)

    # --- devices -----------------------------------------------------------------------------
    c.mesh_shape = (-1, 1, 1)  # one -1 is filled with the remaining devices
    c.mesh_axes = ("data", "fsdp", "tensor")
    # The batch is split over these mesh axes.
    c.data_axes = ("data", "fsdp")
    # logical axis name (zoo/axes.py) -> mesh axis or tuple of mesh axes; first rule wins;
    # a dimension that does not divide the mesh axis size is replicated (attention heads
    # excepted: a head count the tensor axis cannot split is an error on the kernel path).
    c.logical_axis_rules = (
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("classes", None),
        ("kv", None),
        ("conv_in", None),
        ("norm", None),
        ("pos", None),
        ("latents", None),
        # Activations and kernel operands (kernels_pallas/sharding.py). Their batch always
        # follows data_axes. Kernels never split length, height or width.
        ("activation_heads", "tensor"),
        ("activation_mlp", "tensor"),
        ("activation_vocab", "tensor"),
        ("activation_length", None),
        ("activation_height", None),
        ("activation_width", None),
        ("activation_embed", None),
        ("activation_kv", None),
    )

    # Context parallelism: attention over a sequence split across the `sequence` mesh axis
    # (kernels_pallas/context_parallel.py). Inert unless mesh_axes has a `sequence` axis of size
    # > 1 and a rule maps activation_length to it; `with_context_parallelism` sets all three.
    c.context_parallel = ml_collections.ConfigDict()
    c.context_parallel.strategy = "ring"  # ring | all_to_all (README: which to pick)
    c.context_parallel.load_balance = True  # zigzag layout for causal ring attention

    # --- checkpoints, eval, logging ----------------------------------------------------------
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.async_checkpointing = True

    c.eval_every = 50  # 0 = only at the end
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    c.eval.num_batches = 0  # 0 = the whole eval split

    c.log_every = 10
    c.logging = ml_collections.ConfigDict()
    c.logging.progress_bar = True
    c.logging.tensorboard = True
    c.logging.profile_steps = ()  # (first, last) step range for a jax profiler trace

    # --- the task's own fields ---------------------------------------------------------------
    cls = tasks.task_class(task)
    if cls.config_key is not None:
        if cls.config_key in c:
            raise ValueError(f"task {task!r}: config_key {cls.config_key!r} is a shared config "
                             f"field")
        c[cls.config_key] = cls.default_config()
    return c
