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

# Stores: one fresh view per epoch of the official 240-epoch schedule. What a store holds (its form: logits, features,
# their dtype, the forward's precision) and the defaults of each are kdcache.store.form's.
DEFAULT_VIEWS = 240

# Resident views (kdcache.resident): the share of the device's free memory (on the CPU, of the memory available)
# that the views a run holds at once may take (two: the one training and the next being read; one for a plan of
# one view). Above it, views are streamed block by block.
VIEW_SHARE = 0.4

# The teacher's forward under autocast (precompute --amp): its dtype; by default float16 on CUDA, bfloat16 elsewhere.
AMP_DTYPES = ("bfloat16", "float16")

TEMPERATURE = 4.0          # the KD temperature T of the official code, distill's and a top-K store's default
