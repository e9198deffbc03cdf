"""The live widget of a job (plain ipywidgets: no front-end code of our own) and the comm pump
that lets its Cancel button work while the kernel is blocked in a foreground ``%%gpu`` cell.

The widget is an HTML status (the same HTML as the text form, ``_view.render_html``), a Cancel
button while the job is queued or running, and for a background job an Output area holding the
cell's output. Its display bundle always carries the text and HTML forms too, so a front end
without widgets, nbconvert, and a notebook saved and reopened without a kernel show a readable
summary; the display is updated with the final forms when the job ends.

Why a pump: a foreground cell keeps the kernel's main thread busy, so the click's ``comm_msg``
would wait until the cell ends. ipykernel 7 receives shell messages on a shell-channel thread and
hands those for the main shell to the main thread through an in-process ZMQ stream, read by the
main thread's event loop, which our cell blocks. While we wait for events, ``CommPump`` reads that
stream (``ZMQStream.flush``, as ipykernel's GUI event-loop integrations do) with a callback of its
own: a ``comm_msg`` for one of *our* widgets is handled at once; every other message is handed,
untouched and in order, to the kernel's own callback, which queues it exactly as it would have.
Nothing is held back or replayed, so an interrupt in the middle cannot lose a queued cell.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from ._view import JobState, NullView, bundle, display_due, outputs_html, outputs_text, render_html

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# A foreground job that ends before this shows only a compact summary, never a widget.
UPGRADE_AFTER_S = 1.0
QUEUED_UPGRADE_S = 0.2
TICK_S = 1.0
OUTPUT_FLUSH_S = 0.2

# comm ids of our live widgets: the pump handles their messages, and only theirs
_OUR_COMMS: set[str] = set()
_OUR_COMMS_LOCK = threading.Lock()

# Ended jobs' widgets, left open in their final form: a page reloaded while the job ran shows
# the widget again and cannot place the display update that replaces it (display ids do not
# survive a reload), so a closed one left its cell blank (a browser trial). The oldest beyond
# this many are closed, and one keeps a background job's output only up to KEPT_OUTPUT
# bytes (the final display holds it all), which bounds what the kernel keeps of them.
KEPT_ENDED = 16
KEPT_OUTPUT = 1 << 20
_ENDED: collections.deque[Any] = collections.deque()


def widgets_available() -> bool:
    """A Jupyter kernel with comms (not terminal IPython, not plain Python) and ipywidgets."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    if ip is None or getattr(ip, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class WidgetView(NullView):
    """The live widget; starts as the text/HTML status and becomes a widget when worth it.

    A background job shows the widget at once (its output lives in it). A foreground job shows
    the status after ``SHOW_AFTER_S`` (sooner if output comes, the job ends or someone cancels
    it: always above the cell's output) and upgrades it to the widget after
    ``UPGRADE_AFTER_S``, or after ``QUEUED_UPGRADE_S`` if it is still waiting for a GPU, so a
    quick cell leaves only a compact summary in the notebook.
    """

    def __init__(self, state: JobState, *, on_cancel: Callable[[str], None] | None = None,
                 status: bool = True) -> None:
        super().__init__(state)
        self._on_cancel = on_cancel
        self._status = status  # False: --quiet background job, only its output area
        self._lock = threading.RLock()
        self._handle: Any = None
        self._shown_at = 0.0
        self._last_html = ""
        self._last_tick = 0.0
        self._box: Any = None
        self._html: Any = None
        self._button: Any = None
        self._out: Any = None
        self._outputs: list[dict[str, Any]] = []
        self._output_ids: dict[str, list[int]] = {}
        self._clear_pending = False
        self._outputs_dirty = False
        self._outputs_sent = 0.0
        self._finished = False
        self._pending = False  # shown, but not displayed yet (a foreground job's first moment)
        self._reshow = False  # a clear_output(wait=True) will clear it with the next output
        # a --quiet background job shows nothing until it has something to show: its output
        # area appears with its first output, or as its cell ends while it still runs (later
        # output can reach that cell only as widget state)
        self._deferred = False

    @property
    def has_output_area(self) -> bool:
        return self.state.background

    # --- showing ---

    def show(self) -> None:
        self._shown_at = time.monotonic()
        with self._lock:
            if self.state.background and not self._status:
                self._defer()
            elif self.state.background:
                self._build()
                self._handle = self._show_status(self._bundle())
            else:
                self._pending = True

    def _defer(self) -> None:
        from IPython import get_ipython

        ip = get_ipython()
        if ip is None:
            return
        self._deferred = True

        def cell_ended(*_: Any) -> None:
            ip.events.unregister("post_run_cell", cell_ended)
            with self._lock:
                if self._deferred and not self._finished:  # it may print after the cell
                    self._show_deferred()

        ip.events.register("post_run_cell", cell_ended)

    def _show_deferred(self) -> None:
        """Display the output area of a --quiet background job (its cell still runs)."""
        self._deferred = False
        self._build()
        self._handle = self._show_status(self._bundle())

    def before_output(self) -> None:
        """The cell is about to show something of its own: the status goes above it."""
        with self._lock:
            self._display_pending(time.monotonic())
            if self._reshow:  # this display is the output a clear_output(wait=True) waited for
                self._reshow = False
                self._display_again()

    def after_clear(self, wait: bool = False) -> None:
        """The cell cleared its output, the status above it too: show it again, under the
        same display id (its updates still land), above what the cell shows next. With
        ``wait`` the front end clears only when the next output comes: shown then."""
        with self._lock:
            if self._handle is None or self._finished or self.state.background:
                return
            if wait:
                self._reshow = True  # shown now, it would itself be the output waited for
            else:
                self._display_again()

    def _display_again(self) -> None:
        data = (self._bundle() if self._box is not None
                else bundle(self.state, time.monotonic()))
        self._handle.display(data, raw=True)

    def _display_pending(self, now: float, compact: bool = False) -> None:
        if self._pending:
            self._pending = False
            self._handle = self._show_status(bundle(self.state, now, compact=compact))

    def display_again(self) -> None:
        """Show the same live widget once more (the handle evaluated in another cell)."""
        from IPython.display import display

        with self._lock:
            data = self._final_data() if self._finished else None
            if data is None and self._box is None:
                self._build()
            if data is None:
                data = self._bundle()
            if self._handle is not None:  # under the same display id: the end updates it too
                self._handle.display(data, raw=True)
            else:
                display(data, raw=True)

    def _build(self) -> None:
        import ipywidgets as w

        children = []
        if self._status:
            self._html = w.HTML(value=self._render())
            self._last_html = self._html.value
            self._button = w.Button(description="Cancel", icon="stop", button_style="warning",
                                    tooltip="cancel this GPU job and release its GPUs",
                                    layout=w.Layout(width="auto", flex="0 0 auto"))
            self._button.on_click(self._clicked)
            if self.state.final:
                self._button.layout.display = "none"
            # (wrapped: in a narrow notebook Cancel goes under the status, not off the side)
            children.append(w.HBox([self._html, self._button],
                                   layout=w.Layout(align_items="flex-start",
                                                   flex_flow="row wrap")))
        if self.state.background:
            self._out = w.Output()
            self._out.outputs = tuple(self._outputs)
            children.append(self._out)
        self._box = w.VBox(children)
        self._box.add_class("gpu-magic-widget")
        with _OUR_COMMS_LOCK:
            _OUR_COMMS.update(_comm_ids(self._box))

    def _render(self) -> str:
        return render_html(self.state, time.monotonic())

    def _bundle(self) -> dict[str, Any]:
        if self._status:
            data: dict[str, Any] = dict(bundle(self.state, time.monotonic()))
        else:  # --quiet: where the widget cannot show, only what the job printed
            data = {"text/plain": "".join(o.get("text", "") for o in self._outputs
                                          if o.get("output_type") == "stream")}
        if self._box is not None:
            data[WIDGET_MIME] = {"version_major": 2, "version_minor": 0,
                                 "model_id": self._box.model_id}
        return data

    def comm_ids(self) -> set[str]:
        return _comm_ids(self._box) if self._box is not None else set()

    # --- updating ---

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if self._pending:
                if display_due(self.state, self._shown_at, now, force):
                    self._display_pending(now)  # as it is now: nothing more to send
                return
            if self._handle is None or self._finished:
                return
            if self._box is None:
                # upgrade to the widget once the job is worth watching: it runs a while, or
                # it still waits in the queue a moment after submitting (every job is queued
                # first, and most are granted at once), or someone cancels it
                waited = now - self._shown_at
                if (waited >= UPGRADE_AFTER_S or self.state.cancel or self.state.interrupt
                        or self.state.state == "queued" and waited >= QUEUED_UPGRADE_S):
                    self._build()
                    self._handle.update(self._bundle(), raw=True)
                    self._last_tick = now
                elif force:
                    self._handle.update(bundle(self.state, now), raw=True)
                return
            if self._html is not None:
                value = self._render()
                if value != self._last_html:
                    self._last_html = value
                    self._html.value = value
            if self._button is not None and self.state.cancel and not self._button.disabled:
                self._button.disabled = True
                self._button.description = "Cancelling…"
            self._last_tick = now
            self._flush_outputs()

    def tick(self) -> None:
        """Time passed: the elapsed time, the upgrade, pending output."""
        now = time.monotonic()
        if self._box is None or now - self._last_tick >= TICK_S:
            self.refresh()
        elif self._outputs_dirty and now - self._outputs_sent >= OUTPUT_FLUSH_S:
            with self._lock:
                self._flush_outputs()

    def finish(self) -> None:
        """The job ended (or we stopped following it): the final forms, no more Cancel."""
        with self._lock:
            now = time.monotonic()
            if self._deferred:  # a --quiet background job that printed nothing: nothing shown
                self._finished = True
                return
            if self._pending:  # a quick job: its final status is its only display
                self._display_pending(now, compact=True)
                self._finished = True
                return
            if self._handle is None or self._finished:
                return
            if self._box is None:  # shown (output came) but never a widget: the same card
                # form it had while running (one line at the end read as another display)
                self._handle.update(bundle(self.state, now), raw=True)
                self._finished = True
                return
            self._finished = True
            with _OUR_COMMS_LOCK:
                _OUR_COMMS.difference_update(_comm_ids(self._box))
            # its final status needs no widget: shown as HTML, it reads the same in a notebook
            # opened again without its kernel (a widget there says "Loading widget..." or
            # "model not found", front ends rarely keep widget state); a background job's
            # output, which lived in its widget, goes below it (see _final_data)
            self._handle.update(self._final_data(), raw=True)
            self._settle_widget()

    def _settle_widget(self) -> None:
        """The widget in its final form, kept open (see KEPT_ENDED), and no longer ours to
        update: the display update above replaces it wherever the front end can place it."""
        if self._html is not None:
            self._html.value = self._last_html = self._render()
        if self._button is not None:
            self._button.layout.display = "none"
        if _rough_size(self._outputs) > KEPT_OUTPUT:
            self._outputs_dirty = False
            if self._out is not None:
                self._out.outputs = ()
        else:
            self._flush_outputs(force=True)
        _ENDED.append(self._box)
        while len(_ENDED) > KEPT_ENDED:
            _close_all(_ENDED.popleft())
        self._box = self._html = self._button = self._out = None

    def _final_data(self) -> dict[str, str]:
        """The ended job's display: its final status and, for a background job, its output."""
        data = dict(bundle(self.state, time.monotonic())) if self._status else {}
        if not self.state.background:
            return data
        text, markup = outputs_text(self._outputs), outputs_html(self._outputs)
        if text:
            data["text/plain"] = (data.get("text/plain", "") + "\n" + text).lstrip("\n")
        if markup:
            data["text/html"] = data.get("text/html", "") + markup
        return data or {"text/plain": ""}

    def reopen(self) -> None:
        """Show the final state again, from the main thread at a safe point (names bound, or
        a background job that ended another way). Sent even if unchanged here: the first
        sending may have gone out between two cells, under a request that had already ended,
        and a front end that files messages by request (nbclient, nbconvert) dropped it."""
        with self._lock:
            if self._handle is None:
                return
            if self._finished and self._box is None:  # its widget is gone: the final forms
                self._handle.update(self._final_data(), raw=True)
                return
            if self._html is not None:
                value = self._render()
                if value != self._html.value:
                    self._html.value = self._last_html = value
                else:
                    self._html.send_state("value")
            sent = self._out.outputs if self._out is not None else None
            self._flush_outputs(force=True)
            if self._out is not None and self._out.outputs == sent:
                # unchanged, so the assignment sent nothing: its one sending may have been
                # dropped the same way (a background job's output flushed as it ended)
                self._out.send_state("outputs")
            self._handle.update(self._bundle(), raw=True)

    def cancel_failed(self) -> None:
        with self._lock:
            if self._button is not None:
                self._button.disabled = False
                self._button.description = "Cancel"
        self.refresh()

    def _clicked(self, _button: Any) -> None:
        if self._on_cancel is not None and not self.state.final:
            self._on_cancel("the Cancel button")
            self.refresh()

    # --- a background job's output, kept inside the widget ---

    def append_output(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        with self._lock:
            if kind == "clear_output":
                if ev.get("wait"):
                    self._clear_pending = True
                else:
                    self._outputs, self._output_ids = [], {}
                self._outputs_dirty = True
                return
            if self._clear_pending:
                self._outputs, self._output_ids, self._clear_pending = [], {}, False
            if kind in ("stdout", "stderr"):
                name = kind
                last = self._outputs[-1] if self._outputs else None
                if last and last.get("output_type") == "stream" and last.get("name") == name:
                    self._outputs[-1] = dict(last, text=last["text"] + ev.get("text", ""))
                else:
                    self._outputs.append({"output_type": "stream", "name": name,
                                          "text": ev.get("text", "")})
            elif kind == "display":
                self._outputs.append({"output_type": "display_data", "data": ev.get("data", {}),
                                      "metadata": ev.get("metadata") or {}})
                if ev.get("display_id"):
                    self._output_ids.setdefault(ev["display_id"], []).append(len(self._outputs) - 1)
            elif kind == "update_display":
                for i in self._output_ids.get(ev.get("display_id") or "", []):
                    self._outputs[i] = {"output_type": "display_data", "data": ev.get("data", {}),
                                        "metadata": ev.get("metadata") or {}}
            elif kind == "traceback":
                self._outputs.append({"output_type": "stream", "name": "stderr",
                                      "text": ev.get("text", "")})
            else:
                return
            if self._deferred and self._finished:  # (its value, bound after it ended)
                self._deferred = False
                self._handle = self._show_status(self._final_data())
                return
            if self._deferred:
                self._show_deferred()  # (its cell still runs: see _defer)
            self._outputs_dirty = True
            if self._finished or time.monotonic() - self._outputs_sent >= OUTPUT_FLUSH_S:
                self._flush_outputs()

    def _flush_outputs(self, force: bool = False) -> None:
        if self._out is None or not (self._outputs_dirty or force):
            return
        # the whole list goes over the wire each time: coalesce, and at most every 0.2 s
        self._out.outputs = tuple(self._outputs)
        self._outputs_dirty = False
        self._outputs_sent = time.monotonic()


def _rough_size(outputs: list[dict[str, Any]]) -> int:
    """About how many bytes ``outputs`` hold (their texts and display data)."""
    return sum(len(str(v)) for o in outputs
               for v in (o.get("text"), *(o.get("data") or {}).values()) if v)


def _close_all(widget: Any) -> None:
    """Close a widget and every widget inside it (their comms go with them)."""
    for child in getattr(widget, "children", ()):
        _close_all(child)
    with contextlib.suppress(Exception):
        widget.close()


def _comm_ids(box: Any) -> set[str]:
    ids: set[str] = set()
    stack = [box]
    while stack:
        w = stack.pop()
        comm = getattr(w, "comm", None)
        if comm is not None and getattr(comm, "comm_id", None):
            ids.add(comm.comm_id)
        stack.extend(getattr(w, "children", ()) or ())
    return ids


class CommPump:
    """Handle our widgets' comm messages while the main thread waits in a foreground cell.

    Use as a context manager around the wait, calling :meth:`pump` often. Outside a Jupyter
    kernel's main thread, or on a kernel whose shell stream we do not know, it does nothing and
    the Cancel button takes effect after the cell (Ctrl-C / the stop button always works).
    """

    def __init__(self) -> None:
        self._stream: Any = None
        self._original: Any = None
        self._copy = False
        self._kernel: Any = None
        self.active = False  # in a kernel's main thread whose shell stream we can read
        self._installed = False  # reading it: only once a widget of ours is open

    def __enter__(self) -> CommPump:
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            from IPython import get_ipython
        except ImportError:
            return self
        kernel = getattr(get_ipython(), "kernel", None)
        stream = _main_shell_stream(kernel)
        original = getattr(stream, "_recv_callback", None)
        if stream is None or original is None or getattr(kernel, "comm_manager", None) is None:
            return self
        self._kernel, self._stream, self._original = kernel, stream, original
        self._copy = bool(getattr(stream, "_recv_copy", False))
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            self._stream.on_recv(self._original, copy=self._copy)
            self._installed = False
        self.active = False

    def needed(self) -> bool:
        """Whether a message could be for us: only while some widget of ours is open (a
        foreground job's widget appears after a second; a quick cell never has one)."""
        return self.active and bool(_OUR_COMMS)

    def pump(self) -> None:
        if not self.needed():
            return
        import zmq

        try:
            if not self._installed:  # (messages meanwhile waited in the stream's socket)
                self._stream.on_recv(self._on_recv, copy=self._copy)
                self._installed = True
            self._stream.flush(zmq.POLLIN)
        except Exception:  # a closed stream (kernel shutting down): stop pumping
            self.__exit__()

    def _on_recv(self, msg: list[Any]) -> Any:
        session = self._kernel.session
        try:
            idents, frames = session.feed_identities(msg, copy=self._copy)
            # a peek (content=False) does not record the signature, so the kernel can still
            # take the very same message afterwards
            peek = session.deserialize(frames, content=False, copy=self._copy)
            if peek["header"]["msg_type"] == "comm_msg":
                raw = peek["content"]
                content = session.unpack(raw.bytes if hasattr(raw, "bytes") else raw)
                with _OUR_COMMS_LOCK:
                    ours = content.get("comm_id") in _OUR_COMMS
                if ours:
                    full = session.deserialize(frames, content=True, copy=self._copy)
                    self._kernel.comm_manager.comm_msg(None, idents, full)
                    return None
        except Exception:
            pass  # anything we cannot read is the kernel's business, as before
        return self._original(msg)


def _main_shell_stream(kernel: Any) -> Any:
    """The ZMQ stream from which the kernel's main thread reads its shell messages."""
    if kernel is None:
        return None
    try:
        from ipykernel.eventloops import get_shell_stream
    except ImportError:  # ipykernel 6: the main thread reads the shell socket itself
        return getattr(kernel, "shell_stream", None)
    try:
        return get_shell_stream(kernel)
    except Exception:
        return None
