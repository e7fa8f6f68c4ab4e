"""The web's side of the queue: enqueue a job, follow its stream channel, fail over to another
replica. Speaks the wire protocol (`common.protocol`) only: no engine, no torch."""
