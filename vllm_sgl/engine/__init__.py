"""Everything that imports vLLM: the plugin (routing `--model-impl sgl`, start-up checks), the
target wrappers, the scheduler's guide phase, the guide runner the model runner owns, the runner
hooks, metrics and the server command. See docs/ARCHITECTURE.md."""
