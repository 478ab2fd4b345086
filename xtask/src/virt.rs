//! Board runner (filled in by the board's issue).

/// Builds and runs the board; returns (passed, failed).
pub fn run(_extra: &[String], _demo: bool) -> Result<(usize, usize), String> {
    Err("board runner not implemented yet".into())
}
