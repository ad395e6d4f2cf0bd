# Sourced by the launchers, with CONFIG set (the stage-1 config) and the arguments
# after the run directory as its own: sets STAGE2_CONFIG and the arrays stage1_args
# and stage2_args.
#
# Stage 2 starts from the same preset (configs/stage2.py:PRESET) where CONFIG is
# configs/stage1.py[:PRESET]; with another stage-1 config file, set STAGE2_CONFIG.
preset=''
if [[ $CONFIG == *:* ]]; then preset=":${CONFIG##*:}"; fi
if [[ -z ${STAGE2_CONFIG:-} && ${CONFIG%%:*} != configs/stage1.py ]]; then
  echo "$0: CONFIG=$CONFIG is not configs/stage1.py[:PRESET]; set STAGE2_CONFIG too" >&2
  exit 2
fi
STAGE2_CONFIG=${STAGE2_CONFIG:-configs/stage2.py$preset}
# Overrides for stage 1, then, after a lone --, overrides for stage 2.
stage1_args=() stage2_args=() into=1
for arg in "$@"; do
  if [[ $arg == -- && $into == 1 ]]; then into=2; continue; fi
  if [[ $into == 1 ]]; then stage1_args+=("$arg"); else stage2_args+=("$arg"); fi
done
