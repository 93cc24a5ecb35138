#!/usr/bin/env bash
# The one GPU check: run from the repository root on the rented GPU machine, with $OUT an output folder,
#
#     OUT=/path/to/out bash bench/gpu_check.sh      # carrying .whl (typer 0.29 and pydantic for the CLI) and
#                                                   # .gpu_data (tinyshakespeare: ../shared does not travel)
#
# It prints the GPU, installs carried wheels (.whl/*.whl) into /tmp/site and puts src/ on PYTHONPATH (the package
# is not pip-installed there), then runs each step under its own timeout, going on past failures:
#   data             char tokenizer + `lmstack data prepare` of tinyshakespeare (../shared/data, else .gpu_data/)
#   bench-eager      bench/gpu_pretrain.py: lmstack's trainer vs transformers GPT-2, 124M shape, bf16
#   pretrain-single  `lmstack pretrain`, a small GPT-2, 30 steps
#   pretrain-ddp     the same under torchrun --nproc_per_node=1 --strategy ddp
#   pretrain-fsdp    the same with --strategy fsdp
#   losses-match     the three runs' losses, printed, within 1% of single's
#   w8a8-rows        w8a8 with 1-16 rows (padded to 17 on CUDA) equals the same rows in a batch of 32
#   generate-gpu     bench/gpu_generate.py on the bench's checkpoint: bf16 eager / compiled, int8, nf4 (int4
#                    and w8a8 tried, reported as CPU-only by design when they fail)
#   generate-cli     `lmstack generate --json` on the same checkpoint, --device auto (the GPU)
#   finetune-gpu     `lmstack finetune` lora and qlora, 10 steps, --device auto (the GPU)
#   bench-compile    bench/gpu_pretrain.py --compile
# and ends with a PASS/FAIL summary. Files in $OUT: gpu_check.log (everything printed), gpu_pretrain-eager.{md,json},
# gpu_pretrain-compile.{md,json}, distributed.json, gpu_generate.json. About 6 minutes on an H200; steps are cut
# at GPU_CHECK_BUDGET seconds (default 570), so the summary is always printed, and all are skipped without CUDA.
# GPU_CHECK_WORK (default /tmp/gpu_check) is its scratch folder, emptied first; GPU_CHECK_STEPS (names from the
# list above, space-separated) runs only those steps.
#
# CPU validation, tiny sizes, every step's code path (nvidia-smi is skipped with a message; the generation rows
# that are expected to fail on a GPU run on the CPU):
#     GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python OUT=/tmp/gpu_check_out bash bench/gpu_check.sh
set -u

OUT=${OUT:?set OUT to the output folder}
export DEVICE=${GPU_CHECK_DEVICE:-cuda}
export PY=${PYTHON:-python3}
export WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-570}
# .whl holds wheels for python3.12 there; a CPU validation installs none unless pointed at its own Python's
[ "$DEVICE" = cpu ] && WHEELS=${GPU_CHECK_WHEELS:-} || WHEELS=${GPU_CHECK_WHEELS:-.whl}
export OUT PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"

if [ "$DEVICE" = cpu ]; then
    export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    export BENCH="--device cpu --steps 3 --warmup 2 --batch-size 2 --seq-len 32 --no-record
                  --set n_layer=2 --set n_head=2 --set d_model=64"
    export SMALL="--set n_layer=2 --set n_head=2 --set d_model=64 --seq-len 32 --batch-size 4 --max-steps 6
                  --eval-every 3"
    export GENERATE="--device cpu --new-tokens 24 --repeats 2"
else
    export BENCH="--device cuda --steps 40 --warmup 10 --batch-size 16 --seq-len 1024 --record"
    export SMALL="--set n_layer=4 --set n_head=4 --set d_model=256 --seq-len 256 --batch-size 16 --max-steps 30
                  --eval-every 10"
    export GENERATE="--device cuda --new-tokens 200 --repeats 3"
fi
# the char vocabulary (68) padded to a multiple of 64, as bench/gpu_pretrain.py pads it
export PRETRAIN="--model gpt2-124m --shards $WORK/shards --set vocab_size=128 --precision bf16 --lr 1e-3
                 --warmup-steps 5 --eval-batches 4 --no-progress --no-resume $SMALL"

environment() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi here"; fi
    if [ "$DEVICE" = cpu ]; then
        $PY -c 'import torch; print(torch.__version__, "CUDA available:", torch.cuda.is_available())'
    else
        $PY -c 'import torch;print(torch.__version__, torch.cuda.get_device_name())'
    fi
}

data() {
    local text=${LMSTACK_DATA:-../shared/data}/tinyshakespeare/input.txt
    [ -f "$text" ] || text=.gpu_data/tinyshakespeare/input.txt  # carried: ../shared does not travel
    $PY -m lmstack tokenizer train "$text" --out "$WORK/tokenizer" --kind char --doc-split file &&
    $PY -m lmstack data prepare "$text" --out "$WORK/shards" --tokenizer "$WORK/tokenizer" --split tail \
        --doc-split file --no-dedup --val-fraction 0.1 --no-progress
}

bench() {  # bench [--compile]
    # shellcheck disable=SC2086  (word splitting of the option lists is meant)
    $PY bench/gpu_pretrain.py $BENCH "$@" --shards "$WORK/shards" --work-dir "$WORK/bench" --out-dir "$OUT"
}

pretrain() {  # pretrain single|ddp|fsdp
    if [ "$1" = single ]; then
        $PY -m lmstack pretrain $PRETRAIN --out "$WORK/$1" --strategy single
    else  # torchrun itself, without relying on the PATH
        $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m lmstack pretrain $PRETRAIN \
            --out "$WORK/$1" --strategy "$1"
    fi
}

losses_match() {
    $PY - "$WORK" "$OUT/distributed.json" <<'EOF'
import json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = {s: [json.loads(line) for line in (work / s / "metrics.jsonl").read_text().splitlines()]
        for s in ("single", "ddp", "fsdp") if (work / s / "metrics.jsonl").exists()}
for strategy, records in runs.items():
    print(f"{strategy:6s} " + "  ".join(f"step {r['step']}: train {r['train_loss']:.4f} val {r['val_loss']:.4f}"
                                        for r in records))
base = runs.get("single")
worst = max((abs(r[k] - b[k]) / b[k] for s in ("ddp", "fsdp") if s in runs and base
             for r, b in zip(runs[s], base) for k in ("train_loss", "val_loss")), default=float("nan"))
ok = base is not None and len(runs) == 3 and all(len(r) == len(base) for r in runs.values()) and worst < 0.01
print("final losses: " + ", ".join(f"{s} {r[-1]['val_loss']:.4f}" for s, r in runs.items())
      + f"; largest relative difference from single: {worst:.2e} ({'within' if ok else 'NOT within'} 1%)")
out.write_text(json.dumps({"runs": runs, "largest_relative_difference": worst, "ok": ok}, indent=1))
sys.exit(0 if ok else 1)
EOF
}

checkpoint() {  # the 124M bench model when the bench ran, else the small single run's
    local c
    for c in "$WORK/bench/lmstack-eager/final" "$WORK/single/final"; do
        [ -f "$c/lmstack.json" ] && { echo "$c"; return; }
    done
    echo "$WORK/bench/lmstack-eager/final"
}

generate_gpu() {
    local model; model=$(checkpoint)
    echo "checkpoint: $model"
    $PY bench/gpu_generate.py --model "$model" $GENERATE --out "$OUT/gpu_generate.json"
}

generate_cli() {  # the verb on --device auto: the GPU when there is one
    local model; model=$(checkpoint)
    echo "checkpoint: $model"
    $PY -m lmstack generate --model "$model" --prompt "ROMEO:" --max-new-tokens 64 --temperature 0 --json |
        tee "$WORK/generate.json" && grep -q "\"device\": \"$DEVICE" "$WORK/generate.json"
}

w8a8_rows() {  # w8a8's few-row padding on CUDA (torch._int_mm wants more than 16 rows there)
    $PY - "$DEVICE" <<'EOF'
import sys
import torch
from lmstack.quant.int8 import Int8Linear

device = sys.argv[1]
torch.manual_seed(0)
linear = torch.nn.Linear(512, 256).to(device)
layer = Int8Linear.from_float(linear, mode="w8a8")
x = torch.randn(32, 512, device=device, dtype=torch.bfloat16)
with torch.no_grad():
    full = layer(x)  # [32, 256], no padding
    same = all(torch.equal(layer(x[:m]), full[:m]) for m in (1, 6, 16))
    err = (full.float() - linear(x.float())).abs().max().item()
print(f"w8a8 on {device}: rows 1, 6, 16 {'equal' if same else 'NOT equal'} to the batched result; "
      f"max |error| against the float linear {err:.3f}")
sys.exit(0 if same and err < 0.1 else 1)
EOF
}

finetune_gpu() {  # lmstack finetune, lora and qlora, on --device auto (the GPU when there is one)
    local model m; model=$(checkpoint)
    $PY -c 'import json; [print(json.dumps({"instruction": f"say {i}", "output": f"I say {i}."})) for i in range(64)]' \
        > "$WORK/say.jsonl"
    for m in lora qlora; do
        $PY -m lmstack finetune --method "$m" --model "$model" --data "$WORK/say.jsonl" --template plain \
            --out "$WORK/ft-$m" --max-seq-len 32 --max-steps 10 --batch-size 8 --eval-every 5 --eval-batches 2 \
            --no-progress > "$WORK/ft-$m.json" || return 1
        $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], {k: r[k] for k in ("device",
            "steps", "train_loss", "best_val_loss", "elapsed_s", "trainable_params")}); sys.exit(r["device"] != sys.argv[3])' \
            "$WORK/ft-$m.json" "$m" "$DEVICE" || return 1
    done
}

export -f environment data bench pretrain losses_match checkpoint generate_gpu generate_cli w8a8_rows finetune_gpu

SUMMARY=()
STOP=""  # why the remaining steps are skipped, once they must be
step() {  # step NAME TIMEOUT_S FUNCTION [ARGS...]: run under the smaller of its timeout and the time left
    local name=$1 limit=$2; shift 2
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then return 0; fi
    local left=$((BUDGET - SECONDS))
    [ "$left" -ge 10 ] || STOP=${STOP:-no time left}
    if [ -n "$STOP" ]; then
        echo; echo "=== $name: skipped ($STOP)"
        SUMMARY+=("$(printf '%-16s %-28s' "$name" "FAIL (skipped: $STOP)")"); return 1
    fi
    echo; echo "=== $name: $* (timeout $((limit < left ? limit : left)) s, at $SECONDS s)"
    local start=$SECONDS
    timeout -k 10 "$((limit < left ? limit : left))" bash -c '"$@"' _ "$@"
    local rc=$? verdict=PASS
    [ $rc -eq 0 ] || verdict="FAIL (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))"
    SUMMARY+=("$(printf '%-16s %-28s %4d s' "$name" "$verdict" $((SECONDS - start)))")
    return $rc
}

main() {
    echo "gpu_check: device $DEVICE, python $PY, work $WORK, out $OUT, $(date -u +%FT%TZ)"
    if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "installing carried wheels:" "$WHEELS"/*.whl
        if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                "$WHEELS"/*.whl; then
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
            SUMMARY+=("$(printf '%-16s %-28s' wheels PASS)")
        else
            SUMMARY+=("$(printf '%-16s %-28s' wheels FAIL)")
        fi
    fi
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

    # without a GPU every later step would run the GPU sizes on the CPU, for nothing
    step environment      60 environment || [ "$DEVICE" = cpu ] || STOP="no CUDA device"
    step data             90 data
    step bench-eager     120 bench
    step pretrain-single  90 pretrain single
    step pretrain-ddp    120 pretrain ddp
    step pretrain-fsdp   120 pretrain fsdp
    step losses-match     30 losses_match
    step w8a8-rows        60 w8a8_rows
    step generate-gpu    180 generate_gpu
    step generate-cli     90 generate_cli
    step finetune-gpu    120 finetune_gpu
    step bench-compile   300 bench --compile  # last: the longest, and the one the budget may cut

    echo; echo "=== summary ($DEVICE, $SECONDS s in all)"
    printf '%s\n' "${SUMMARY[@]}"
    local failed; failed=$(printf '%s\n' "${SUMMARY[@]}" | grep -c FAIL)
    echo "$([ "$failed" -eq 0 ] && echo "ALL PASS" || echo "$failed FAILED")"
    [ "$failed" -eq 0 ]
}

set -o pipefail
main 2>&1 | tee "$OUT/gpu_check.log"
