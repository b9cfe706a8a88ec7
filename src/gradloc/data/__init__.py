"""Stage 1, `gradloc download`: the corpus every later stage reads (docs/formats.md,
`corpus/`). `synthetic` renders an invented temporal world offline; `temporalwiki`,
`ecbd` and `local` read real data into the same tables."""

DOC_COLUMNS = ["doc_id", "snapshot", "title", "text", "kind"]
TRIPLE_COLUMNS = ["snapshot", "subject_id", "subject", "relation", "object", "object_id"]
ENTITY_COLUMNS = ["entity_id", "name", "aliases", "type"]
PROBE_COLUMNS = ["period", "set", "subject", "relation", "object", "prefix"]
