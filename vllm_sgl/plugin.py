"""vLLM general plugin entry point (loaded by the front end, engine core and every worker)."""


def register() -> None:
    # Idempotent by construction: nothing is registered yet.
    return None
