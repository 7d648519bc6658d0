//! What one `PATCH` of front insertions costs: N operations `add /a/0` on `{"a": []}`, applied
//! as the push source applied them before (`diff::apply`, the json-patch crate) and as it does
//! now (`diff::apply_bounded` with `MAX_APPLY_WORK`, which refuses the patch once its work
//! would pass the bound).
//!
//! ```text
//! cargo run --release --example patch_cost -- 80000
//! ```

use std::time::Instant;

use patchwire::diff::{self, Patch};
use serde_json::{Value, json};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(80_000);
    let ops: Vec<Value> = (0..n)
        .map(|i| json!({"op": "add", "path": "/a/0", "value": i}))
        .collect();
    let patch: Patch = match serde_json::from_value(Value::Array(ops)) {
        Ok(patch) => patch,
        Err(e) => {
            eprintln!("patch_cost: {e}");
            return;
        }
    };

    let mut doc = json!({"a": []});
    let started = Instant::now();
    let unbounded = diff::apply(&mut doc, &patch);
    let unbounded_time = started.elapsed();

    let mut doc = json!({"a": []});
    let started = Instant::now();
    let bounded = diff::apply_bounded(&mut doc, &patch, diff::MAX_APPLY_WORK);
    let bounded_time = started.elapsed();

    println!("{n} front insertions into an empty array:");
    println!(
        "- diff::apply (before):         {:>9.1} ms, {}",
        unbounded_time.as_secs_f64() * 1000.0,
        if unbounded.is_ok() {
            "applied"
        } else {
            "failed"
        }
    );
    println!(
        "- diff::apply_bounded (after):  {:>9.1} ms, {}",
        bounded_time.as_secs_f64() * 1000.0,
        match bounded {
            Ok(()) => "applied".to_owned(),
            Err(e) => format!("refused: {e}"),
        }
    );
}
