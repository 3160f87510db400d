//! Where progress goes: the library never prints, its callers show a bar (the trainer) or a line (the page).

/// Implementations must be cheap: `inc` is called once per row from every worker thread.
pub trait Progress: Sync {
    fn start(&self, _stage: &str, _total: u64) {}
    fn inc(&self, _n: u64) {}
    fn finish(&self) {}
}

/// Progress that goes nowhere.
pub struct Silent;
impl Progress for Silent {}
