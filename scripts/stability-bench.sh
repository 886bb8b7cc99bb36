#!/usr/bin/env bash
# The stability benchmark: a baseline GAN and the GAN with each stabilizer, on the 2-D ring and grid,
# over several seeds; prints a markdown table of modes captured, high-quality samples (within 3σ of a mode)
# and reverse KL over modes, as mean ± standard error (protocol: ../shared/DESIGN.md; results and
# published numbers: docs/stabilizers.md).
#
#   scripts/stability-bench.sh [--base quick|pacgan] [--steps N] [--seeds "0 1 2"] [--jobs J]
#                              [--data "ring grid"] [--out DIR] [variant ...]
#
# --base quick (default) uses examples/stability/quick_{ring,grid}.toml (PacGAN's shapes at a quarter of
# the width, 4,000 steps); --base pacgan uses PacGAN's exact setup (pacgan_{ring,grid}.toml; the paper
# trains 400,000 steps: pass --steps). Runs go to DIR/<data>-<variant>-s<seed> (default runs/stability);
# a finished run is reused, so an interrupted benchmark resumes where it stopped. Variants (default all):
# gan, wgan_gp, r1, spectral_norm, pacgan, instance_noise, unrolled, and the combinations pacgan_r1
# (packing + R1) and sn_r1 (spectral norm + R1). Needs a release build
# (`cargo build --release`).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
nash="$root/target/release/nash"
base=quick
steps=""
seeds="0 1 2"
jobs=2
datasets="ring grid"
out="$root/runs/stability"
variants=()
while [ $# -gt 0 ]; do
    case "$1" in
        --base) base=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --data) datasets=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) variants+=("$1"); shift ;;
    esac
done
[ ${#variants[@]} -gt 0 ] || variants=(gan wgan_gp r1 spectral_norm pacgan instance_noise unrolled pacgan_r1 sn_r1)
[ -x "$nash" ] || { echo "no release build at $nash: run \`cargo build --release\` first" >&2; exit 1; }

# The --set overrides that turn the baseline pipeline into variant $1 on data set $2, one per line.
overrides() {
    local pack=2
    [ "$2" = grid ] && pack=4
    case "$1" in
        gan) ;;
        wgan_gp)
            # Gulrajani et al.: Wasserstein critic, λ = 10, five critic steps, Adam(β 0.5, 0.9).
            echo 'model.objective={type="wasserstein"}'
            echo 'model.discriminator_steps=5'
            echo 'optimizers.discriminator.betas=[0.5, 0.9]'
            echo 'optimizers.generator.betas=[0.5, 0.9]'
            echo 'stabilizers=[{type="wgan_gp", lambda=10.0}]' ;;
        r1) echo 'stabilizers=[{type="r1", gamma=1.0}]' ;;
        spectral_norm) echo 'stabilizers=[{type="spectral_norm", layers="discriminator.*"}]' ;;
        pacgan) echo "model.discriminator.layers[0].samples=$pack" ;;
        instance_noise) echo 'stabilizers=[{type="instance_noise", sigma=0.1, anneal_steps=4000}]' ;;
        unrolled) echo 'stabilizers=[{type="unrolled", steps=5}]' ;;
        pacgan_r1)
            echo "model.discriminator.layers[0].samples=$pack"
            echo 'stabilizers=[{type="r1", gamma=1.0}]' ;;
        sn_r1) echo 'stabilizers=[{type="spectral_norm", layers="discriminator.*"}, {type="r1", gamma=1.0}]' ;;
        *) echo "unknown variant $1" >&2; return 2 ;;
    esac
}

run_one() { # data variant seed
    local data=$1 variant=$2 seed=$3 dir="$out/$1-$2-s$3"
    if [ -f "$dir/summary.json" ] && grep -q '"status": "completed"' "$dir/summary.json"; then
        return 0
    fi
    local args=()
    while IFS= read -r line; do
        [ -n "$line" ] && args+=(--set "$line")
    done < <(overrides "$variant" "$data")
    [ -n "$steps" ] && args+=(--steps "$steps")
    rm -rf "$dir"
    if ! "$nash" train "$root/examples/stability/${base}_$data.toml" --seed "$seed" --threads 1 --quiet \
        --out "$dir" "${args[@]}" > "$dir.log" 2>&1; then
        echo "failed: $data $variant seed $seed (log: $dir.log)" >&2
    fi
}
export -f run_one overrides
export nash root out base steps

mkdir -p "$out"
for data in $datasets; do
    for variant in "${variants[@]}"; do
        for seed in $seeds; do
            echo "$data $variant $seed"
        done
    done
done | xargs -P "$jobs" -L 1 bash -c 'run_one "$@"' _

# One metric of a finished run's final evaluation.
metric() { # file key
    grep -A8 '"final_metrics"' "$1" | grep "\"$2\"" | head -1 | sed 's/.*: *//; s/,$//'
}

echo
echo "| data | variant | modes captured | high-quality samples (%) | reverse KL | steps/s | seeds |"
echo "|---|---|---|---|---|---|---|"
for data in $datasets; do
    for variant in "${variants[@]}"; do
        rows=""
        for seed in $seeds; do
            f="$out/$data-$variant-s$seed/summary.json"
            if [ -f "$f" ] && grep -q '"status": "completed"' "$f"; then
                rows+="$(metric "$f" modes_captured) $(metric "$f" high_quality_share) $(metric "$f" reverse_kl) $(grep '"steps_per_s"' "$f" | sed 's/.*: *//; s/,$//')"$'\n'
            fi
        done
        # reverse_kl is null (undefined) for a run that captured no mode: it is left out of the KL mean,
        # and the KL cell says over how many seeds it is defined.
        printf '%s' "$rows" | awk -v data="$data" -v variant="$variant" '
            NF == 4 {
                n++
                for (i = 1; i <= 4; i++) if (i != 3) { s[i] += $i; q[i] += $i * $i }
                if ($3 != "null") { k++; s[3] += $3; q[3] += $3 * $3 }
            }
            function ms(i, m_n, scale,   m, v) {
                m = s[i] / m_n
                v = m_n > 1 ? (q[i] - m_n * m * m) / (m_n - 1) : 0
                if (v < 0) v = 0
                return sprintf(scale == 100 ? "%.1f ± %.1f" : "%.2f ± %.2f", m * scale, sqrt(v / m_n) * scale)
            }
            END {
                if (n == 0) { printf "| %s | %s | (no finished run) | | | | 0 |\n", data, variant; exit }
                kl = k == 0 ? "undefined (no mode)" : ms(3, k, 1) (k < n ? sprintf(" (%d of %d seeds)", k, n) : "")
                printf "| %s | %s | %s | %s | %s | %.0f | %d |\n", data, variant, ms(1, n, 1), ms(2, n, 100), kl, s[4] / n, n
            }'
    done
done
