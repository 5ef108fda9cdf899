"""`awaker serve`: the OpenAI Chat Completions API over the generation engine, with continuous batching."""
from .app import create_app
from .scheduler import Job, QueueFull, Scheduler

__all__ = ["Job", "QueueFull", "Scheduler", "create_app", "serve"]


def serve(engine, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_context: int | None = None, max_queue: int = 64, allow_local_images: str | None = None,
          ready=None) -> None:
    """Run the server until SIGINT/SIGTERM: uvicorn stops accepting, gives open requests a few seconds,
    then the scheduler stops (what is still decoding ends as interrupted)."""
    import uvicorn

    scheduler = Scheduler(engine, max_batch=max_batch, max_context=max_context, max_queue=max_queue)
    app = create_app(scheduler, model_name=model_name, api_key=api_key, allow_local_images=allow_local_images)
    scheduler.start()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
    server = _Server(config)
    try:
        if ready is not None:
            ready(server, scheduler)
        server.run()
    finally:
        scheduler.stop()



def _Server(config):
    """A uvicorn server that, once a signal has shut it down, returns instead of raising the signal again
    (which uvicorn does, and which would kill the process before the scheduler stops)."""
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return Server(config)
