//! The report renders from the committed example JSON: every bench's section, its plots as
//! images, the microbenchmarks' table and the sweep's recommendation.

use std::path::Path;

#[test]
fn the_report_builds_from_the_committed_examples() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let out = tempfile::tempdir().unwrap();
    let page = tuning::report::render(&ex.join("bench"), Path::new("/nonexistent"), &ex.join("tune"), out.path()).unwrap();
    let md = std::fs::read_to_string(&page).unwrap();
    for want in ["## transport", "| `ratio_8` |", "## Microbenchmarks", "hash_1MiB/blake3", "## Tuning sweep", "Recommended:"] {
        assert!(md.contains(want), "{want} missing from:\n{md}");
    }
    for f in ["transport-gbps.png", "transport-cpu_s_per_gb.png"] {
        let img = image::open(out.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(img.width() >= 600 && img.height() >= 200, "{f}");
        assert!(md.contains(&format!("]({f})")), "{f} is linked");
    }
    // Every figure with runs becomes a row: the transport bench has 13 cases of goodput.
    let figs = tuning::report::figures(&serde_json::from_str(&std::fs::read_to_string(ex.join("bench/transport.json")).unwrap()).unwrap());
    assert_eq!(figs.iter().filter(|f| f.metric == "gbps").count(), 13);
    assert!(figs.iter().all(|f| f.min <= f.median && f.median <= f.max && f.runs == 5));
}
