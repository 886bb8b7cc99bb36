//! `nash bench speed` end to end, as CI runs it (seconds): one short measurement of each workload
//! (the DCGAN at batch 8) gives one JSON record per workload with positive finite steps/s and peak
//! memory, plus the matrix-product row; a workload name that does not exist is refused with the
//! valid names.

use std::process::Command;

use nash_core::serde_json::{self, Value};
use nash_tests::support;

fn nash() -> Command {
    let mut cmd = Command::new(support::nash_binary());
    cmd.env_remove("NASH_PLUGIN_PATH");
    cmd
}

fn positive(record: &Value, key: &str) -> f64 {
    let v = record[key].as_f64().unwrap_or(f64::NAN);
    assert!(v.is_finite() && v > 0.0, "{key} = {v} in {record}");
    v
}

#[test]
fn smoke_run_gives_one_record_per_workload() {
    let out = support::scratch_dir("bench-speed").join("speed.json");
    let short = [
        "--threads",
        "1",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--json",
    ];
    let mut cmd = nash();
    cmd.args(["bench", "speed", "--workload", "autoencoder", "--workload", "mlp_gan"])
        .args(short)
        .arg("--out")
        .arg(&out);
    let stdout = support::run_ok(&mut cmd).stdout;
    let records: Vec<Value> = serde_json::from_slice(&stdout).expect("a JSON array on stdout");
    let written: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(records, written);
    let workloads: Vec<&str> = records.iter().map(|r| r["workload"].as_str().unwrap()).collect();
    assert_eq!(workloads, ["matmul_peak", "autoencoder", "mlp_gan"]);
    for r in &records {
        assert_eq!(r["framework"], "nash");
        assert_eq!(r["threads"].as_u64(), Some(1));
        // `--steps` sizes the workloads' runs; the product's step count is always calibrated.
        if r["workload"] != "matmul_peak" {
            assert_eq!(r["steps"].as_u64(), Some(2));
        }
        assert!(r["steps"].as_u64().is_some_and(|n| n >= 1));
        assert_eq!(r["steps_per_s"].as_array().map(Vec::len), Some(1));
        positive(r, "median");
        positive(r, "min");
        positive(r, "peak_rss_mb");
    }
    let ae = &records[1];
    assert_eq!((ae["batch"].as_u64(), ae["width"].as_f64()), (Some(64), Some(1.0)));
    // 6 x 64 x 160768 FLOP per step, and a share of the matrix-product peak.
    assert!((positive(ae, "gflop_per_step") - 0.061_734_912).abs() < 1e-12);
    positive(ae, "percent_of_matmul_peak");
    positive(&records[0], "gflops");

    let mut cmd = nash();
    cmd.args([
        "bench",
        "speed",
        "--workload",
        "dcgan",
        "--batch",
        "8",
        "--width",
        "0.5",
    ])
    .args(short);
    let records: Vec<Value> = serde_json::from_slice(&support::run_ok(&mut cmd).stdout).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1]["workload"], "dcgan");
    assert_eq!(records[1]["batch"].as_u64(), Some(8));
    positive(&records[1], "median");
    positive(&records[1], "peak_rss_mb");
}

#[test]
fn unknown_workload_lists_the_valid_names() {
    let output = nash()
        .args(["bench", "speed", "--workload", "resnet", "--threads", "1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("resnet") && ["autoencoder", "mlp_gan", "dcgan"].iter().all(|w| stderr.contains(w)),
        "{stderr}"
    );
    let output = nash()
        .args(["bench", "speed", "--batch", "4096", "--threads", "1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("1..=1024"));
}
