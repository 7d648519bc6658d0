//! `patchwire-load`: open N SSE subscribers against any SSE server, publish K changes (or
//! watch a polled stream), and report latency, delivery, order and the server's cost.
//! See `patchwire-load --help` and `benches/fanout/README.md`.

use std::process::ExitCode;

use clap::Parser;
use patchwire_load::{self as load, Args};

fn main() -> ExitCode {
    let args = Args::parse();
    // One thread: the client shares the machine with the server it measures.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("patchwire-load: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(spec) = &args.worker {
        let result = runtime.block_on(load::worker(spec));
        // Do not wait for the blocking stdin reader: the report is out, the work is done.
        runtime.shutdown_timeout(std::time::Duration::from_millis(100));
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("patchwire-load worker: {e}");
                ExitCode::from(2)
            }
        };
    }
    let plan = match args.validate() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("patchwire-load: {e}");
            return ExitCode::from(2);
        }
    };
    let exe = std::env::current_exe().ok();
    let mut report = match runtime.block_on(load::run(&plan, exe.as_deref())) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("patchwire-load: {e}");
            return ExitCode::from(2);
        }
    };
    report.label = args.label.clone();
    match args.json.as_deref() {
        Some("-") => match serde_json::to_string(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("patchwire-load: encoding the report: {e}");
                return ExitCode::from(2);
            }
        },
        Some(path) => {
            print!("{report}");
            let written = serde_json::to_vec_pretty(&report)
                .map_err(|e| e.to_string())
                .and_then(|json| std::fs::write(path, json).map_err(|e| e.to_string()));
            if let Err(e) = written {
                eprintln!("patchwire-load: writing {path}: {e}");
                return ExitCode::from(2);
            }
        }
        None => print!("{report}"),
    }
    if report.delivery_failed() && !plan.allow_missing {
        eprintln!(
            "patchwire-load: FAILED delivery check: {} missing, {} out of order over {} changes (pass --allow-missing if expected)",
            report.missing, report.out_of_order, report.changes
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
