"""Stage 1: train the encoder with cross-entropy + lambda * supervised contrastive.

Run (the embedded digits data set, long-tailed with ratio 10; about a minute on
a 2-core CPU):

  python -m imbal_jax.main --config=configs/stage1.py --workdir=runs/digits/stage1

Expect a table of per-class recall for val and test, and DIR/report.json.
Presets (`configs/stage1.py:PRESET`):
  digits_lt         the default, embedded data, no download
  ham10000          ../shared/data/ham10000_28.npz (HAM10000 at 28 px, natural imbalance)
  dermamnist        a MedMNIST .npz, e.g. --config.data_path=dermamnist_64.npz
  fashion_mnist_lt  Debian's dataset-fashion-mnist IDX files, imbalance ratio 100
  cifar10_lt, cifar100_lt   tensorflow-datasets array_record data, ratio 100
  isic2019          ISIC 2019 images + ground-truth CSV (--config.data_path, --config.labels_csv;
                    --config.groups_csv=the metadata CSV keeps lesions within one split)
  hyper_kvasir      Hyper-Kvasir labelled images (class folders; --config.data_path)
Override any field on the command line, e.g. `--config.contrastive_weight=0`
for the plain CE baseline.

Where the defaults come from:
- SGD, momentum 0.9, peak learning rate 0.1 at batch 128 and ResNet-32: as in
  Cao et al. (2019, LDAM), whose learning rate then steps down (x0.01 at epochs
  160 and 180 of 200, weight decay 2e-4). Cosine decay and weight decay 5e-4
  as in Kang et al. (2020, decoupling / cRT; ResNeXt-50 on ImageNet-LT, lr 0.2
  at batch 512). 30 epochs (the non-digits presets) is this project's budget,
  from neither paper. cifar10_lt and cifar100_lt follow Cao et al. throughout,
  their step schedule included.
- temperature 0.1: Khosla et al. (2020) report 0.1 as their best for
  supervised contrastive learning.
- contrastive_weight 0.5 and a 128-dimensional projection: a constant weight
  of this project's choosing (the hybrid SupCon + CE networks of Wang et al.
  2021 instead move the weight from the contrastive loss to cross-entropy over
  training) and SupCon's usual projection size; treat the weight as a knob.
"""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = 'stage1'
  # Data.
  config.dataset = 'digits'
  config.data_path = ''  # a file or folder, for file-based data sets
  config.data_dir = ''  # tensorflow-datasets data_dir
  config.tfds_name = ''
  config.labels_csv = ''  # ISIC ground truth
  # ISIC metadata CSV (image, lesion_id): carved val/test splits keep each lesion's
  # images together, so no lesion is in both training and test.
  config.groups_csv = ''
  config.image_size = 0  # 0: as stored; image-file data sets need a size
  config.skip_corrupt = False
  # None keeps the data's own class distribution; >= 1 subsamples training to that ratio.
  config.imbalance_ratio = config_dict.placeholder(float)
  config.split_seed = 0  # fixes val/test where the data set has none
  config.val_fraction = 0.1  # of what is left after the test split
  config.test_fraction = 0.2
  config.sampler = 'instance'
  # True: half of each batch from the sampler, each followed by another image of its
  # class, so every anchor of the metric loss has a positive (batch_size must be even).
  config.batch_pairs = False
  config.augment = 'crop'
  config.crop_padding = 1
  config.data_workers = 0  # grain worker processes; 0 reads in the training process
  # Model.
  config.model = 'resnet32'
  config.width = 16
  config.projection_dim = 128
  # 'bfloat16': convolutions and matmuls in bfloat16; parameters, statistics and losses float32.
  config.dtype = 'float32'
  # Loss: classification loss + contrastive_weight * metric loss (imbal_jax/objectives.py).
  config.loss = 'ce'  # ce | focal | cb | ldam_drw | logit_adjusted | balanced_softmax
  config.focal_gamma = 2.0  # Lin et al. (2017)
  config.cb_beta = 0.9999  # Cui et al. (2019); also the DRW weights of ldam_drw
  config.ldam_max_margin = 0.5  # Cao et al. (2019)
  # Cao et al. use s=30 on cosine logits; this project's head is a plain linear
  # layer, whose logits are not normalised, so the scale defaults to 1.
  config.ldam_scale = 1.0
  config.drw_start_fraction = 0.8  # Cao et al.: epoch 160 of 200
  config.logit_adjust_tau = 1.0  # Menon et al. (2021)
  config.metric_loss = 'supcon'  # supcon | balanced_supcon | triplet | class_center
  config.contrastive_weight = 0.5
  # False: the encoder learns from the metric loss alone; the classifier is trained on
  # detached features (a linear probe), as in SupCon-only pre-training.
  config.classification_trains_encoder = True
  config.temperature = 0.1
  config.margin = 0.2  # triplet and class-centre losses, on unit-length embeddings
  config.center_momentum = 0.9
  config.num_views = 1  # 2: two augmented views of each image
  # Optimisation. batch_size is the GLOBAL batch over all devices and hosts.
  config.batch_size = 64
  # > 1: run each batch in this many micro-batches (less memory; batch norm per micro-batch).
  config.grad_accum_steps = 1
  config.num_epochs = 30
  config.learning_rate = 0.05
  config.warmup_epochs = 2
  # After the warm-up: 'cosine' decay to 0, or 'step': the learning rate times
  # lr_decay_factor at each of the epochs lr_decay_epochs ('E1,E2,...').
  config.lr_schedule = 'cosine'
  config.lr_decay_epochs = ''
  config.lr_decay_factor = 0.01
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.seed = 0
  # A non-finite loss or gradient stops the run (the update is never applied);
  # True skips such updates instead and counts them in metrics.jsonl.
  config.skip_nonfinite = False
  # Evaluation: head / medium / tail classes by training count: 'terciles' of the
  # classes, 'oltr' (> 100 / 20-100 / < 20 images, Liu et al. 2019) or 'HIGH,LOW'.
  config.frequency_groups = 'terciles'
  # Bookkeeping.
  config.eval_every_epochs = 1
  config.eval_batch_size = 256
  config.log_every_steps = 20
  config.checkpoint_every_epochs = 1
  config.init_from = ''  # stage 2 only
  # 16-bit grey image files keep the top 8 of this many significant bits: 12 for
  # the 12-bit values many X-ray and CT exports store in 16-bit files.
  config.bit_depth = 16
  return config


def _small_medical(config):
  """28-64 px dermoscopy / microscopy: ResNet-32, the augmentations that suit lesions."""
  config.model = 'resnet32'
  config.augment = 'rrc+flip+vflip+rot90+jitter'


PRESETS = ('digits_lt', 'ham10000', 'dermamnist', 'fashion_mnist_lt', 'cifar10_lt',
           'cifar100_lt', 'isic2019', 'hyper_kvasir')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or 'digits_lt'
  config = base_config()
  if preset != 'digits_lt':
    # lr 0.1 at batch 128 as Cao et al. (2019); 30 epochs is this project's budget.
    config.update(batch_size=128, learning_rate=0.1, num_epochs=30)
  if preset == 'digits_lt':
    # 477 training images (118 of class 0 down to 11 of class 9), 8x8 grey.
    config.imbalance_ratio = 10.0
  elif preset == 'ham10000':
    config.dataset = 'medmnist'
    config.data_path = '../shared/data/ham10000_28.npz'
    _small_medical(config)
  elif preset == 'dermamnist':
    config.dataset = 'medmnist'
    config.data_path = 'dermamnist.npz'
    _small_medical(config)
  elif preset == 'fashion_mnist_lt':
    config.dataset = 'idx'
    config.data_path = '/usr/share/datasets/fashion-mnist'
    config.imbalance_ratio = 100.0
    config.augment = 'crop+flip'
    config.crop_padding = 2
  elif preset in ('cifar10_lt', 'cifar100_lt'):
    # Cao et al. (2019): ResNet-32, ratio 100, 200 epochs, batch 128, lr 0.1, 5 warm-up
    # epochs, weight decay 2e-4, the learning rate times 0.01 at epochs 160 and 180.
    config.lr_schedule = 'step'
    config.lr_decay_epochs = '160,180'
    config.dataset = 'tfds'
    config.tfds_name = preset.split('_')[0]
    config.imbalance_ratio = 100.0
    config.augment = 'crop+flip'
    config.crop_padding = 4
    config.num_epochs = 200
    config.warmup_epochs = 5
    config.weight_decay = 2e-4
  elif preset in ('isic2019', 'hyper_kvasir'):
    config.dataset = 'isic' if preset == 'isic2019' else 'folder'
    config.image_size = 224
    config.model = 'resnet50'
    config.width = 64
    config.augment = 'rrc+flip+vflip+rot90+jitter'
  else:
    raise ValueError(f'unknown preset {preset!r}; choose one of {", ".join(PRESETS)}')
  # A label: which preset's settings these are (stage 2 notes a preset other than its
  # stage 1's). It changes nothing by itself.
  config.preset = preset
  return config
