"""kdcache's defaults as plain values, importable without torch, zarr or dask.

The command line reads them to build its options and help (so `kdcache --help` answers
at once); the modules that use them import them from here, so each value is set once.
"""

# The official CA-MKD / RepDistiller training schedule.
EPOCHS = 240
BATCH_SIZE = 64
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LR = 0.05
LR_SMALL_NETS = 0.01
SMALL_NETS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
MILESTONES = (150, 180, 210)
LR_DECAY = 0.1

# Stores: one fresh view per epoch of the official 240-epoch schedule; what is stored besides the logits.
DEFAULT_VIEWS = 240
FEATURE_FORMS = ("pooled", "spatial", "none")
DEFAULT_FEATURE_FORM = "pooled"
# How stored features are kept: float16, or int8 with one float32 scale a row (about half the bytes).
FEATURE_DTYPES = ("float16", "int8")
DEFAULT_FEATURE_DTYPE = "float16"
# How the features array is compressed before its CRC32C: Blosc zstd level 1 (the default), or not at all, which
# stores spatial maps in about 1.9x the bytes but writes and reads them at a fraction of the CPU time
# (benchmarks/RESULTS.md, "Uncompressed maps"). Not part of the teacher id: the values are the same.
FEATURE_COMPRESSIONS = ("zstd", "none")
DEFAULT_FEATURE_COMPRESSION = "zstd"

# Resident views (kdcache.resident): the share of the device's free memory (on the CPU, of the memory available)
# that the views a run holds at once may take (two: the one training and the next being read; one for a plan of
# one view). Above it, views are streamed block by block.
VIEW_SHARE = 0.4

# The teacher's forward under autocast (precompute --amp): its dtype; by default float16 on CUDA, bfloat16 elsewhere.
AMP_DTYPES = ("bfloat16", "float16")

# Logits: every class's logit (dense), or a top-K store's K largest with the scalars that keep the methods'
# weights exact ("topk:K", docs/STORE.md); a top-K store serves distillation at one temperature.
DEFAULT_LOGITS = "dense"
TEMPERATURE = 4.0          # the KD temperature T of the official code, distill's and a top-K store's default
