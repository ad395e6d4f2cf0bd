"""The standard table of methods, shared by the data-set presets of this folder.

A method is a dict: `name` (letters, digits and `+-._=`: it is typed in
`--methods` and heads its row of the table), `stage1` (overrides of
configs/stage1.py:PRESET) and `stage2` (overrides of configs/stage2.py:PRESET,
or None for a one-stage method, whose stage-1 run is evaluated as it is).
Methods whose stage-1 configs agree share their stage-1 runs: CE, CE+cRT and
the CE+<stage-2 method> rows all re-use one CE run per seed.

The table: the classification-loss baselines (Lin et al. 2017; Cui et al.
2019; Cao et al. 2019; Menon et al. 2021; Ren et al. 2020), cRT on a CE
encoder (Kang et al. 2020), CE + lambda * metric loss then cRT for each metric
loss, lambda in {0.1, 1} with SupCon (lambda 0 is CE+cRT, 0.5 is
CE+0.5SupCon+cRT: together the lambda ablation), SupCon-only pre-training
then cRT (Khosla et al. 2020; Kang et al. 2020), and the other stage-2
methods on the CE encoder.
"""

# The stage-1 objective of the baselines: no metric-loss term.
NO_METRIC_LOSS = {'contrastive_weight': 0.0}
METRIC_LOSSES = (('SupCon', 'supcon'), ('BalSupCon', 'balanced_supcon'),
                 ('Triplet', 'triplet'), ('ClassCenter', 'class_center'))
# Stage-2 methods other than cRT (configs/stage2.py: config.stage2_method).
STAGE2_METHODS = (('tau-norm', 'tau_norm'), ('LWS', 'lws'), ('NCM', 'ncm'),
                  ('posthoc-LA', 'posthoc_la'))


def method(name: str, stage1: dict, stage2: dict | None = None) -> dict:
  return {'name': name, 'stage1': stage1, 'stage2': stage2}


def _weight_name(weight: float) -> str:
  return f'{weight:g}'


def standard_methods(metric_weight: float = 0.5,
                     ablation_weights: tuple[float, ...] = (0.1, 1.0)) -> list[dict]:
  """The table's methods, baselines first.

  Args:
    metric_weight: lambda of the CE + lambda * metric loss methods.
    ablation_weights: further SupCon lambdas (the ablation's other points are
      CE+cRT, lambda 0, and CE+<metric_weight>SupCon+cRT).
  """
  methods = [
      method('CE', {'loss': 'ce', **NO_METRIC_LOSS}),
      method('CE+cRT', {'loss': 'ce', **NO_METRIC_LOSS}, {}),
      method('focal', {'loss': 'focal', **NO_METRIC_LOSS}),
      method('CB', {'loss': 'cb', **NO_METRIC_LOSS}),
      method('LDAM-DRW', {'loss': 'ldam_drw', **NO_METRIC_LOSS}),
      method('logit-adjusted', {'loss': 'logit_adjusted', **NO_METRIC_LOSS}),
      method('balanced-softmax', {'loss': 'balanced_softmax', **NO_METRIC_LOSS}),
  ]
  for title, metric_loss in METRIC_LOSSES:
    methods.append(method(
        f'CE+{_weight_name(metric_weight)}{title}+cRT',
        {'loss': 'ce', 'metric_loss': metric_loss, 'contrastive_weight': metric_weight}, {}))
  for weight in ablation_weights:
    methods.append(method(
        f'CE+{_weight_name(weight)}SupCon+cRT',
        {'loss': 'ce', 'metric_loss': 'supcon', 'contrastive_weight': weight}, {}))
  # The metric loss alone trains the encoder (the classifier is a linear probe).
  methods.append(method('SupCon+cRT', {'loss': 'ce', 'metric_loss': 'supcon',
                                       'contrastive_weight': 1.0,
                                       'classification_trains_encoder': False}, {}))
  for title, stage2_method in STAGE2_METHODS:
    methods.append(method(f'CE+{title}', {'loss': 'ce', **NO_METRIC_LOSS},
                          {'stage2_method': stage2_method}))
  return methods
