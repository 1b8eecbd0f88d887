"""Every configuration field, with its default and a one-line meaning.

Variants (`flickr.py`, `coco.py`, `cc152k.py`, `demo.py`) start from
`get_config()` here and change only what differs. Durations are in epochs;
the code turns them into steps. Override any field on the command line:

    python -m srem_jax.main --config=configs/flickr.py --config.noise.ratio=0.4
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"  # run name; the default workdir is workdirs/<name>

  # ---- data (docs/method.md §Data) -----------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = "f30k_precomp"  # dataset folder name under raw_dir (SCAN layout)
  c.data.raw_dir = "data"  # folder that holds <name>/ with {split}_ims.npy and captions
  c.data.vocab_path = ""  # vocab JSON; "" = <raw_dir>/vocab/<name>_vocab.json
  c.data.prepared_dir = ""  # prepared ArrayRecord copy; "" = <raw_dir>/prepared
  c.data.train_split = "train"  # split trained on
  c.data.val_split = "dev"  # split validated on every epoch
  c.data.val_images = 1000  # validate on the first N images of val_split (0 = all)
  c.data.test_split = "test"  # split tested at the end (COCO: testall)
  c.data.eval_protocol = "full"  # full | coco (5 folds of 1K and the whole 5K)
  c.data.caption_len = (
    0  # static padded length; 0 = length buckets (srem_jax/padding.py)
  )
  c.data.num_workers = 0  # grain worker processes for training (0 = in process)
  c.data.features_on_device = False  # keep training image features in device memory (model.dtype) and gather batches by index in the step
  # The embedded synthetic dataset (docs/method.md §Testbed), generated into
  # raw_dir when enabled.
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.enabled = False  # generate the dataset if raw_dir/<name> is missing
  c.data.synthetic.num_train = 2000  # training images (5 captions each)
  c.data.synthetic.num_dev = 200  # dev images
  c.data.synthetic.num_test = 200  # test images
  c.data.synthetic.num_regions = 36  # regions per image
  c.data.synthetic.feature_dim = 2048  # width of a region feature
  c.data.synthetic.num_concepts = 64  # latent concepts shared by images and words
  c.data.synthetic.seed = 0  # generator seed (the dataset is a function of it)
  c.data.synthetic.long_captions = False  # Flickr30K-like long-tailed lengths

  # ---- noisy correspondences (docs/method.md §Noise) -----------------------
  c.noise = ml_collections.ConfigDict()
  c.noise.ratio = 0.2  # fraction of training pairs mismatched on purpose
  c.noise.protocol = "caption"  # caption (NCR/BiCro) | image (DECL/RCL)
  c.noise.seed = 0  # seed of the generated noise
  c.noise.file = ""  # existing .npy noise index; overrides ratio/protocol/seed

  # ---- model: SGRAF (docs/method.md §Network) ------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.head = "sgr"  # sgr (graph reasoning) | saf (attention filtration)
  c.model.img_dim = 2048  # region feature width (must match the data)
  c.model.embed_dim = 1024  # joint embedding width
  c.model.word_dim = 300  # word embedding width
  c.model.sim_dim = 256  # similarity-node width
  c.model.sgr_steps = 3  # graph reasoning steps (SGR)
  c.model.dropout = 0.4  # dropout rate in the text encoder and VisualSA/TextSA
  c.model.smooth = 9.0  # inverse temperature of the region attention softmax
  c.model.dtype = "float32"  # matmul dtype: float32 | bfloat16 (accumulation float32)

  # ---- objective (docs/method.md §Objective) -------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.name = (
    "srem"  # srem | triplet_hardest | ccl | ncr (two models, srem_jax/train/co_training.py)
  )
  # SREM's reading of the paper (srem_jax/methods/readings.py, docs/method.md); the six
  # component fields below take its values when left at "", and
  # warmup_triplet_weight when -1.
  c.loss.reading = "r9"  # r0 ... r9 (docs/method.md, Default reading)
  # warm-up on every pair: ccl | triplet_mean | ccl+triplet_mean | ccl+anchor_triplet_mean
  c.loss.warmup = ""
  c.loss.warmup_triplet_weight = -1.0  # the warm-up triplet's weight beside ccl; -1 = the reading's
  c.loss.selection = ""  # clean-sample filtration: batch | epoch_gmm
  c.loss.clean_loss = ""  # on selected pairs: triplet | ce (in-batch classification)
  c.loss.clean_negatives = ""  # clean triplet negatives: hardest | mean
  c.loss.clean_reduction = ""  # over selected pairs: sum | mean (/ selected count)
  c.loss.entropy_use = ""  # swapped entropy as: weight | margin | inverse
  c.loss.tau = 0.05  # temperature of the in-batch classification logits
  c.loss.energy_temp = 1.0  # T in the energy -T*logsumexp(Z/T)
  c.loss.margin = 0.2  # triplet margin alpha
  c.loss.clean_quantile = 0.5  # batch selection: energy at or below this batch quantile
  c.loss.use_filtration = True  # SREM: train the triplet only on selected clean samples
  c.loss.use_entropy_weight = True  # SREM: apply the swapped entropy (entropy_use)
  c.loss.use_cmbcl = True  # SREM: add the cross-modal biased complementary loss
  c.loss.beta = 0.5  # CMBCL bias strength: Q = (1-beta) U + beta B
  c.loss.bias = "cross_modal"  # form of B: cross_modal | same_modal
  c.loss.cmbcl_weight = 1.0  # lambda in L = L_clean + lambda L_CMBCL
  c.loss.eps = 1e-6  # epsilon inside -log(1 - P + eps)
  c.loss.gmm_iters = 10  # epoch_gmm: EM iterations
  c.loss.gmm_tol = 1e-2  # epoch_gmm: EM tolerance on the log-likelihood
  c.loss.gmm_reg = 5e-4  # epoch_gmm: variance floor
  c.loss.gmm_min_noisy = 0.01  # epoch_gmm: fraction forced noisy when none is flagged

  # ---- NCR, the two-model baseline (loss.name="ncr", docs/ncr.md) ----------
  # Margin and GMM settings come from loss.*; warm-up, epochs and LR from train.*.
  c.ncr = ml_collections.ConfigDict()
  c.ncr.p_threshold = (
    0.5  # a pair is labelled when its GMM clean posterior exceeds this
  )
  c.ncr.soft_margin = "exponential"  # margin m*s(target): exponential | linear | sin
  c.ncr.unlabelled_from_epoch = (
    -1  # co-training epoch (0 = first after warm-up) the unlabelled loss starts; -1 = half of them
  )

  # ---- training (docs/method.md §Training) ---------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.seed = 0  # parameter init, dropout and data order
  c.train.epochs = 40  # training epochs
  c.train.warmup_epochs = 5  # epochs of loss.warmup on all pairs before SREM
  c.train.batch_size = 128  # global batch (divisible by the number of devices)
  c.train.lr = 2e-4  # Adam learning rate
  c.train.lr_decay_epochs = 30  # multiply the LR by lr_decay_factor from this epoch on
  c.train.lr_decay_factor = 0.1  # step decay factor
  c.train.grad_clip = 2.0  # global-norm gradient clipping
  c.train.log_every_steps = 50  # progress/metrics line every N steps
  c.train.steps_per_epoch = 0  # cap on steps per epoch, for smoke tests (0 = full pass)
  c.train.checkpoint_every_steps = 0  # extra mid-epoch checkpoints (0 = per epoch only)

  # ---- profiler trace of a few training steps, into <workdir>/profile ------
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 10  # first traced step (after compilation)
  c.profile.num_steps = 0  # steps traced (0 = no trace); view in TensorBoard/XProf

  # ---- evaluation (docs/method.md §Evaluation) -----------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256  # examples per encoder batch

  # ---- execution: how the work is cut up for the hardware (srem_jax/execution.py)
  # Sizes left at 0 / "" come from the preset; none of them changes the result.
  c.execution = ml_collections.ConfigDict()
  c.execution.preset = (
    "auto"  # auto (from the backend) | cpu | gpu (24 GB and up) | tpu (16 GB)
  )
  c.execution.matmul_precision = (
    "highest"  # highest (exact fp32) | high | default (TF32 / 1-pass bf16)
  )
  c.execution.img_chunk = 0  # images per device per scan step, training SGR
  c.execution.cap_chunk = 0  # captions per scan step: scoring, SAF training
  c.execution.remat = ""  # what a scan step keeps for backward: none | full | dots
  # Captions scored in groups of similar length, each cut to its own bucket
  # (srem_jax/models/heads.py); False pads every caption to its batch's length.
  c.execution.by_length = True
  c.execution.length_group = 0  # captions per length group, training SGR
  c.execution.img_tile = 0  # images per all-pairs evaluation tile
  c.execution.cap_tile = 0  # captions per all-pairs evaluation tile

  # ---- progress of long passes (data preparation, all-pairs scoring, selection)
  c.progress = ml_collections.ConfigDict()
  c.progress.enabled = True  # print done/total, rate and ETA (False = quiet)
  c.progress.delay_s = 5.0  # only for passes running longer than this many seconds

  # ---- devices -------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the data axis (-1 = all)

  return c
