"""The training-job system that the API (app/) and the workers (worker/) share.

A job goes `queued -> running -> succeeded | failed | cancelled`; a running job whose worker stops
(SIGTERM) goes back to `queued`, and one whose worker dies is claimed again by another worker and
resumes from its last saved epoch. Everything here is JSON: records, events, the queue's payloads.
Nothing is pickled.

    records.py       the job record, its events, a worker's claim, and the state machine (once)
    files.py         each job's bulky files in the models folder (corpus, resumable state)
    store.py         the `JobStore` interface, and `open_backend`: the store and the active pointer
    file_store.py    FileStore, embedded mode (no Redis): records as files under models/jobs/
    redis_store.py   RedisStore, Redis mode: hashes, event streams, one queue stream
    redis_client.py  connecting to Redis, and its outages as `StoreUnavailable`
    pointer.py       the active model pointer in Redis (lm/registry.py has the file one)
    retry.py         waiting out a store outage with backoff
    settings.py      the settings every process of the job system reads (TEXTGEN_*)
    errors.py        JobNotFound, JobConflict, StoreUnavailable

It imports lm/ (the registry's pointer protocol, the atomic write) and never app/ or worker/.
"""
