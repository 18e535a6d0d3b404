//! Where the host keeps what cannot be rebuilt: each plugin's state, checkpoint and lineage
//! marker, dead letters and quarantines, the schema registry and the flow index.
//!
//! The data directory holds two sled databases with different promises:
//!
//! - `DATA/index`: the log's index (chunk locations, stream runs, client ids). Disposable:
//!   the log rebuilds it from the segments in `DATA/events` when it is lost.
//! - `DATA/state`: this database. Operational state: back it up with the segments. If it
//!   is lost anyway, projections rebuild their state from the log, and extractors look for
//!   the events they derived before (which name them as their source) before deriving
//!   again, so nothing is derived twice; schemas, dead letters and quarantines are gone.
//!
//! Data directories from before the split kept both in `DATA/index`; the first start moves
//! the operational trees over.

use std::path::Path;

/// Why the state database could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the host's state database in {path}: {source}")]
pub(crate) struct StateDbError {
    path: String,
    #[source]
    source: sled::Error,
}

/// Key in the state database's default tree, set once the operational trees of an older
/// layout have been copied in (and synced), so that a restart cut short after the copy
/// never copies them again over newer state.
const MIGRATED: &[u8] = b"migrated-from-index";

/// Entries copied per batch, so a large tree never needs one batch in memory.
const COPY_BATCH: usize = 10_000;

/// Opens (or creates) `DATA/state` with `cache_bytes` of cache, first moving the
/// operational trees that an older layout kept in the log's index database `index` (the
/// embedded log's; a host on NATS has none).
pub(crate) fn open(
    data: &Path,
    cache_bytes: u64,
    index: Option<&sled::Db>,
) -> Result<sled::Db, StateDbError> {
    let path = data.join("state");
    let err = |source| StateDbError {
        path: path.display().to_string(),
        source,
    };
    let db = crate::log::open_sled(&sled::Config::new().path(&path).cache_capacity(cache_bytes))
        .map_err(err)?;
    if let Some(index) = index {
        migrate(index, &db).map_err(err)?;
    }
    Ok(db)
}

/// Moves every named tree of `from` (all but the log's default tree) into `to`: copied and
/// synced in `to`, marked as done, then dropped from `from`. Interrupted anywhere, the next
/// start finishes it.
fn migrate(from: &sled::Db, to: &sled::Db) -> sled::Result<()> {
    let default = from.name();
    let names: Vec<_> = from
        .tree_names()
        .into_iter()
        .filter(|n| *n != default)
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    if to.get(MIGRATED)?.is_none() {
        for name in &names {
            let src = from.open_tree(name)?;
            let dst = to.open_tree(name)?;
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for item in src.iter() {
                let (k, v) = item?;
                batch.insert(k, v);
                n += 1;
                if n == COPY_BATCH {
                    dst.apply_batch(std::mem::take(&mut batch))?;
                    n = 0;
                }
            }
            dst.apply_batch(batch)?;
        }
        to.flush()?;
        to.insert(MIGRATED, &[1u8][..])?;
        to.flush()?;
        tracing::info!(
            trees = names.len(),
            "copied plugin state, schemas and dead letters out of the log's index into DATA/state"
        );
    }
    for name in &names {
        from.drop_tree(name)?;
    }
    from.flush()?;
    Ok(())
}
