//! `dwcp tune`: sweeps of the knobs the plan exposes, each point repeated until its confidence
//! interval is narrow or a budget is spent, with every run in a CSV (a sweep resumes from it),
//! plots with error bars, and a recommended `[transfer]` config with its measured gain over the
//! defaults. [`stats`] and [`sweep`] are free of I/O; [`runner`] runs the transfer engine,
//! [`plot`] draws, [`tune`] is the command, [`report`] renders the benches' JSON into one page.
#![forbid(unsafe_code)]

pub mod machine;
pub mod plot;
pub mod report;
pub mod runner;
pub mod stats;
pub mod sweep;
pub mod tune;
