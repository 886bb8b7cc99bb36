//! The run report end to end: a short real training run of the ring GAN, then `nash report`
//! writes `metrics.csv`, `curves/*.png` and a self-contained `index.html`, which headless Chromium
//! (Debian's `chromium` package; CI installs it) loads and renders: its screenshot must show the
//! curves. An interrupted copy of the run (no `summary.json`, `metrics.jsonl` cut mid-line) gets a
//! report too, and a folder that is not a run is refused with a clear error. With
//! `NASH_REPORT_SCREENSHOT=<path>` set, the browser's screenshot is copied there.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nash_tests::support;
use nash_trainer::outputs::curves::{GROUPS, PALETTE};

/// A run name with markup in it: the report must show it as text.
const HOSTILE_NAME: &str = "ring <img src=x onerror=alert(1)> & \"friends\"";

fn nash() -> Command {
    let mut cmd = Command::new(support::nash_binary());
    cmd.env_remove("NASH_PLUGIN_PATH");
    cmd
}

/// `chromium` or `chromium-browser` on `PATH`.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Loads `page` in headless Chromium and writes a 1200x2000 screenshot to `png`.
fn screenshot(browser: &Path, page: &Path, png: &Path, profile: &Path) {
    let mut child = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .args(["--window-size=1200,2000"])
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", browser.display()));
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            assert!(status.success() && png.exists(), "chromium failed ({status}): {err}");
            return;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("chromium did not finish the screenshot in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn report_of_a_real_run_renders_in_a_browser() {
    let out = support::scratch_dir("report_ring_gan");
    let run = out.join("run");
    support::run_ok(
        nash()
            .arg("train")
            .arg(support::workspace_root().join("examples/ring_gan.toml"))
            .args(["--quiet", "--steps", "40", "--out"])
            .arg(&run)
            .args(["--set", "training.log_every=5", "--set", "training.eval_every=20"])
            .args(["--set", "training.eval_batches=1", "--set", "training.sample_every=20"])
            .args(["--set", "training.sample_count=200"])
            .arg("--set")
            .arg(format!("name={HOSTILE_NAME}")),
    );
    let printed = support::run_ok(nash().arg("report").arg(&run));
    let index = run.join("index.html");
    assert_eq!(
        String::from_utf8_lossy(&printed.stdout).trim(),
        index.display().to_string()
    );

    // metrics.csv: one row per metrics.jsonl line, the fixed columns then the flattened groups.
    let jsonl = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), jsonl.lines().count() + 1);
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    assert_eq!(header[..4], ["step", "epoch", "split", "elapsed_s"]);
    for column in [
        "losses.loss/discriminator",
        "losses.loss/generator",
        "eval.loss/generator",
        "lr.generator",
        "lr.discriminator",
    ] {
        assert!(header.contains(&column), "no column {column} in {header:?}");
    }
    assert!(header.iter().any(|c| c.starts_with("metrics.")), "{header:?}");
    assert!(header.iter().any(|c| c.starts_with("diagnostics.")), "{header:?}");
    // 40 steps logged every 5, evaluations at 0, 20 and 40.
    assert_eq!(csv.lines().filter(|l| l.contains(",train,")).count(), 8);
    assert_eq!(csv.lines().filter(|l| l.contains(",test,")).count(), 3);

    // One figure per group.
    for (group, _) in GROUPS {
        let png = run.join("curves").join(format!("{group}.png"));
        assert!(png.is_file(), "no {}", png.display());
    }

    // index.html: self-contained (every picture inline), the hostile name escaped.
    let html = std::fs::read_to_string(&index).unwrap();
    let frames = std::fs::read_dir(run.join("samples"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png"))
        .count();
    assert_eq!(frames, 3, "scatter plots at steps 0, 20 and 40");
    assert_eq!(html.matches("src=\"").count(), GROUPS.len() + frames);
    assert_eq!(
        html.matches("src=\"data:image/png;base64,").count(),
        GROUPS.len() + frames
    );
    assert!(!html.contains("<img src=x"), "the run name's markup reached the page");
    assert!(html.contains("ring &lt;img src=x onerror=alert(1)&gt; &amp; &quot;friends&quot;"));
    assert!(html.contains("status-completed") && html.contains("no events"));
    assert!(html.contains("<th>Held-out losses</th>") && html.contains("<th>Metrics</th>"));

    // A browser renders it: the screenshot shows the curves in their colours.
    let Some(browser) = chromium() else {
        panic!(
            "no `chromium` or `chromium-browser` on PATH: the report must be checked in a real browser; \
             install it with `apt-get install -y --no-install-recommends chromium`"
        );
    };
    let shot = out.join("report.png");
    screenshot(&browser, &index, &shot, &out.join("chromium-profile"));
    let img = image::open(&shot).expect("the screenshot is a PNG").to_rgb8();
    assert_eq!(img.dimensions(), (1200, 2000));
    let near = |p: &image::Rgb<u8>, c: (u8, u8, u8)| p.0.iter().zip([c.0, c.1, c.2]).all(|(a, b)| a.abs_diff(b) <= 12);
    let non_white = img.pixels().filter(|p| p.0.iter().any(|&v| v < 235)).count();
    let colors: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    let first = img.pixels().filter(|p| near(p, PALETTE[0])).count();
    let second = img.pixels().filter(|p| near(p, PALETTE[1])).count();
    assert!(
        non_white > 50_000 && colors.len() > 100 && first > 500 && second > 500,
        "the screenshot looks blank: {non_white} non-white pixels, {} colours, {first}/{second} pixels of the \
         curves' first two colours ({})",
        colors.len(),
        shot.display()
    );
    if let Some(dest) = std::env::var_os("NASH_REPORT_SCREENSHOT") {
        std::fs::copy(&shot, dest).unwrap();
    }

    // An interrupted run: no summary.json, the last metrics line cut mid-write.
    let cut = out.join("interrupted");
    std::fs::create_dir_all(&cut).unwrap();
    std::fs::copy(run.join("pipeline.resolved.json"), cut.join("pipeline.resolved.json")).unwrap();
    let keep: Vec<&str> = jsonl.lines().take(4).collect();
    let tail = &jsonl.lines().nth(4).unwrap()[..20];
    std::fs::write(cut.join("metrics.jsonl"), format!("{}\n{tail}", keep.join("\n"))).unwrap();
    support::run_ok(nash().args(["report", "--quiet"]).arg(&cut));
    let html = std::fs::read_to_string(cut.join("index.html")).unwrap();
    assert!(
        html.contains("status-interrupted") && html.contains("1 unreadable line"),
        "{html}"
    );
    assert_eq!(
        std::fs::read_to_string(cut.join("metrics.csv"))
            .unwrap()
            .lines()
            .count(),
        5
    );

    // Not a run folder: a clear error, no panic.
    let output = nash().arg("report").arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && err.contains("is not a run folder"), "{err}");
    assert!(!err.contains("internal error"), "{err}");
}
