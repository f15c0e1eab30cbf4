"""Settings a user edits to switch dataset, model or schedule.

Every UPPERCASE name here can also be overridden from the command line of main.py, test.py,
benchmark.py and reproduce.py: ``--image-size 576``, ``--model unet``, ``--amp false``.
Defaults follow the CE-Net paper (Gu et al., IEEE TMI 2019) on DRIVE.
"""

# --- data -------------------------------------------------------------------------------
DATASET = "drive"             # which reader / scoring / class count: see tasks.DATASETS
DATA_ROOT = "dataset/DRIVE"   # folder holding the dataset in its distributed layout
IMAGE_SIZE = 448              # train/test side in pixels (square); must be a multiple of 32
PATCH_SIZE = 0                # 0: whole images resized to IMAGE_SIZE (the paper). N > 0: train on random
                              # N x N crops at native resolution and test on the whole native image,
                              # zero-padded to a multiple of 32 (IMAGE_SIZE then plays no part)
PATCH_SCALE = 1.0             # with PATCH_SIZE: every image (and label) is resized by this factor before
                              # crops are cut and before prediction, whose probabilities are resized back to
                              # native resolution (> 1 widens capillaries the encoder's stride-4 stem thins)
FOLD = 0                      # cross-validation fold, for datasets evaluated by k-fold
NUM_FOLDS = 5                 # number of folds for those datasets
CROP_SIZE = 800               # optic disc (ORIGA, Messidor): side of the crop around the brightest point
FOLDER_CLASSES = 0            # DATASET "folder" (your own data, docs/folder_dataset.md): 0 lets the training labels
                              # decide (one nonzero value: binary; more: one class per distinct value,
                              # sorted); K >= 2 declares K classes stored as 0..K-1 (2: binary, nonzero = 1)
LABEL_THRESHOLD = 0           # DATASET "folder": 0 reads labels as stored; T > 0 reads them (and masks) as binary
                              # masks, foreground where the value is >= T: JPEG masks (Kvasir-SEG's), whose
                              # compression smears 0/255 along every edge, are then accepted
PREPROCESS = "ours"           # ours: RGB, ImageNet mean/std; authors: as the authors' code (BGR, x/255*3.2-1.6);
                              # clahe: ours after per-channel CLAHE (see data.PREPROCESSINGS).
                              # Checkpoints record theirs, and test.py follows the checkpoint

# --- model ------------------------------------------------------------------------------
MODEL = "cenet"               # see networks.MODELS (cenet, backbone, backbone_dac, ..., unet)
PRETRAINED = "imagenet"       # "imagenet" (torchvision), "none", or a path to a ResNet-34 .pth
INIT_WEIGHTS = ""             # a checkpoint (final.pth, step_<N>.pth, a released one) whose weights the whole model
                              # starts from, for fine-tuning with a fresh optimiser and schedule; PRETRAINED is then unused

# --- optimisation (paper: SGD, momentum 0.9, wd 1e-4, batch 8, poly LR from 4e-3) --------
RECIPE = ""                   # a named set of overrides from recipes.py ("cpu", "hires", ...); flags still win
LOSS = "dice"                 # dice (Eq. 2), bce, ce, dice_bce, varce, weighted_bce_dice (Dice + BCE weighted by
                              # U-Net's border map w = w_c + w0 exp(-(d1 + d2)^2 / (2 sigma^2)), loss.border_weight_map),
                              # weighted_bce_cldice (that + 0.5 (1 - clDice), a centreline term against gaps)
BORDER_W0 = 10.0              # weighted_bce_dice: w0, the most a pixel squeezed between two cells gains (U-Net: 10)
BORDER_SIGMA = 5.0            # weighted_bce_dice: sigma in px; d1, d2 = distances to the nearest two cells (U-Net: 5)
BORDER_CELLS = "background"   # weighted_bce_dice: which class the cells are: background (isbi2012: the regions between
                              # the foreground membranes) or foreground (objects, e.g. glas, monuseg)
OPTIMIZER = "sgd"             # sgd (the paper, with MOMENTUM) or adamw (decoupled WEIGHT_DECAY)
BATCH_SIZE = 8                # global batch, split evenly over torchrun processes
EPOCHS = 300                  # one epoch = ceil(train images / BATCH_SIZE) steps
LR = 4e-3
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
POLY_POWER = 0.9              # lr = LR * (1 - step / total_steps) ** POLY_POWER
WARMUP_STEPS = 0              # linear warm-up of the LR over the first steps (0: none, as in the paper)
AUGMENT = "paper"             # paper: dihedral flips, 90-110 % scaling, shift, HSV jitter; authors_code: as
                              # the authors' code (each with probability 0.5, aspect jitter); flips; elastic
                              # (flips + a smooth random elastic deformation, as EM work uses); camera (paper's,
                              # scale log-uniform in [1/1.5, 1.5]: for other cameras' vessel widths);
                              # camera_photometric (camera + gamma, contrast and blur jitter); none
ELASTIC_ALPHA = 10.0          # elastic: std (px) of the random displacement of each control point (0: identity)
ELASTIC_SPACING = 128         # elastic: control points at most this many px apart over each crop, bicubic between
SEED = 0

# --- machine ----------------------------------------------------------------------------
DEVICE = "auto"               # auto (CUDA if present), cuda, cpu
AMP = True                    # autocast: bf16 on GPUs of compute capability >= 8.0, else fp16 + loss scaling;
                              # bf16 on CPUs that compute it natively (AMX, AVX-512 BF16), else fp32
                              # (devices.amp_dtype). False: fp32 everywhere (the committed tables' precision)
CHANNELS_LAST = True          # memory format on CUDA and for prediction on the CPU (measured faster there);
                              # CPU training stays NCHW (devices.memory_format)
COMPILE = False               # torch.compile the model (falls back with a notice if it fails; off under
                              # torchrun on GPUs, where SyncBatchNorm breaks the graph at every BatchNorm)
DETERMINISTIC = False         # True: bit-identical reruns on CUDA (no cuDNN autotuning, no TF32; slower)

# --- output -----------------------------------------------------------------------------
RUN_NAME = ""                 # empty: <dataset>_<model>_<date-time>
WEIGHTS_DIR = "weights"
RESULTS_DIR = "results"
THRESHOLD = 0.5               # probability threshold for binary masks and Acc/Sen/Spe/F1
POSTPROCESS = "none"          # isbi2012 scoring: the membrane map before thinning: none (prob > THRESHOLD), closing
                              # (that, 3x3 closed), watershed (seeded on the probability); see tasks/em_cells.py.
                              # monuseg: none, or watershed (touching predicted nuclei cut apart; tasks/monuseg.py)
WATERSHED_SEED = 0.2          # POSTPROCESS watershed: pixels below this membrane probability seed the cells
PROTOCOL = "ours"             # ours: native resolution, whole image and FOV; authors: their test_cenet.py (DRIVE)
TTA = True                    # 8-way dihedral test-time augmentation
SPLIT = "test"                # which images test.py scores: test, train, or all (train then test; e.g.
                              # all 28 CHASE_DB1 images for a model trained on another dataset)
EVAL_SCALE = "1"              # models trained on crops (PATCH_SIZE): "1" predicts at the trained scale
                              # (PATCH_SCALE); "auto" resizes each image so its field of view has the diameter
                              # of the training set's (DRIVE: fov.DRIVE_FOV_DIAMETER, 540 px), for another
                              # dataset's images (CHASE_DB1's FOV is 915 px); "field" also matches the
                              # cameras' field angles (DRIVE 45, CHASE_DB1 30 degrees): equal pixels per
                              # degree of retina; a number multiplies PATCH_SCALE
ADAPT_BN = "none"             # test.py: none; train (re-estimate every BatchNorm's running statistics on the scored
                              # dataset's training images, labels unused, before predicting: AdaBN, for a model
                              # carried to another camera); scored (on the very images being scored)
VISDOM_SERVER = "http://localhost"
VISDOM_PORT = 8097
VISDOM = True                 # log to visdom when a server answers; training goes on without
LOG_EVERY = 10                # steps between visdom / progress-bar loss updates
CHECKPOINT_EVERY = 100        # steps between resume points (weights/<run>/last.pth); 0: only when stopped
CHECKPOINT_MIN_SECONDS = 60   # and at least this long apart: a GPU takes 100 steps in ~4 s, and a 230 MB
                              # resume point every 4 s would cost it ~15 % of its time
SNAPSHOT_EVERY = 0            # steps between kept copies of the weights (weights/<run>/step_<N>.pth, test.py
                              # reads them): a learning curve in the test metric; 0: none
RESUME = ""                   # a run's last.pth (or its folder): continue that run exactly where it stopped
