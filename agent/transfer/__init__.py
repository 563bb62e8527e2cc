"""The S3 transfer engine: datasets in (S3 -> local), checkpoints out (local -> S3).

Layers, from pure to edge:
  keys        key -> safe local path, include/exclude globs (pure)
  planner     listing x local manifest x local stat -> actions (pure, streaming)
  progress    rate/ETA and the TTY bar (pure)
  bandwidth   a token bucket shared by every request (pure core, sleeping at the edge)
  manifest    the local dataset manifest in SQLite under state_dir (crash-safe, sorted like S3)
  scheduler   bounded thread pool: at most N requests in flight, stop/deadline aware
  download    one object -> temp file in the destination dir, verified, renamed
  upload      one file -> S3 (single PUT or multipart) with a checksum S3 verifies
  datasets    sync_dataset(): the dataset pre-warm
  checkpoints CheckpointStore: upload/commit, restore, latest, prune
"""
