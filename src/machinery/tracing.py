"""OpenTelemetry tracing as middleware: ``Server(config, middleware=[TracingMiddleware()])``.

Install with ``pip install 'machinery[otel]'``; configure the SDK (tracer provider, exporter,
propagator) as for any OpenTelemetry application.

Producer side: every published signature (``send_task``, each step of ``send_chain``, each
member of ``send_group``/``send_chord``, retries and callbacks a worker publishes) gets a
span ``send <task name>`` of kind PRODUCER, a child of the span current at the call. Its
context is injected into ``Signature.Headers`` with the propagator (W3C ``traceparent`` and
``tracestate`` by default), and also into the signatures that travel nested in it (a chain's
later steps, ``OnSuccess``/``OnError`` callbacks, a chord's callback), so that every member
carries the trace even before a worker republishes it.

Consumer side: the worker extracts that context and runs the task in a span ``process <task
name>`` of kind CONSUMER, parented by the producer's span as the OpenTelemetry messaging
conventions allow for one message processed at a time. The span is current while the task
runs (on its thread too, for ``def`` tasks), so what the task does nests under it; a failure
sets status ERROR with the exception recorded.

A Go Machinery peer traced with a Jaeger tracer writes ``uber-trace-id``: pass
``propagator=JaegerPropagator()`` (from ``opentelemetry-propagator-jaeger``), or set
``OTEL_PROPAGATORS=tracecontext,jaeger``, and our worker continues its traces.
"""

from __future__ import annotations

import contextvars
from collections import OrderedDict
from collections.abc import Iterator

from .errors import MissingExtra
from .middleware import Middleware, Outcome
from .signature import Signature
from .state import FAILURE, RETRY

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingExtra(f"machinery.tracing needs OpenTelemetry: pip install 'machinery[otel]' ({exc})") from exc

__all__ = ["TracingMiddleware"]

#: Producer spans waiting for their publish to finish; one whose publish raised is dropped
#: (never exported) once this many newer ones wait.
_OPEN_SENDS = 100_000

_Held = tuple[Span, contextvars.Token[otel_context.Context]]


class TracingMiddleware(Middleware):
    """Spans around every send and every task processed (see the module docstring).

    ``tracer_provider`` defaults to the global one, ``propagator`` to the global propagator
    (read at each use, so ``OTEL_PROPAGATORS`` and ``propagate.set_global_textmap`` work).
    ``messaging_system`` is the ``messaging.system`` attribute.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
        messaging_system: str = "machinery",
    ) -> None:
        from . import __version__

        self._tracer = trace.get_tracer("machinery", __version__, tracer_provider)
        self._propagator = propagator
        self.messaging_system = messaging_system
        self._sending: OrderedDict[str, Span] = OrderedDict()
        # The span of the task being processed, per task (each runs in its own context).
        self._processing: contextvars.ContextVar[_Held | None] = contextvars.ContextVar(
            f"machinery_tracing_{id(self)}", default=None
        )

    @property
    def propagator(self) -> TextMapPropagator:
        return self._propagator if self._propagator is not None else propagate.get_global_textmap()

    # ------------------------------------------------------------------ producer

    def before_publish(self, signature: Signature) -> None:
        propagator = self.propagator
        parent = None
        if not trace.get_current_span().get_span_context().is_valid and signature.headers:
            # Nothing is traced here: continue the trace the message already carries (a
            # chain step or a callback injected at the first send).
            parent = propagator.extract(signature.headers)
        span = self._tracer.start_span(
            f"send {signature.name}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes=self._attributes(signature, "send"),
        )
        context = trace.set_span_in_context(span)
        if signature.headers is None:
            signature.headers = {}
        propagator.inject(signature.headers, context=context)
        for nested in _carried(signature):
            if nested.headers is None:
                nested.headers = {}
            propagator.inject(nested.headers, context=context)
        sending = self._sending
        sending[signature.uuid] = span
        while len(sending) > _OPEN_SENDS:
            sending.popitem(last=False)

    def after_publish(self, signature: Signature) -> None:
        span = self._sending.pop(signature.uuid, None)
        if span is None:
            return
        if signature.routing_key:  # filled by the broker when the signature named no queue
            span.set_attribute("messaging.destination.name", signature.routing_key)
        span.end()

    # ------------------------------------------------------------------ consumer

    def before_process(self, signature: Signature) -> None:
        parent = self.propagator.extract(signature.headers or {})
        # Parented, not also linked: the conventions allow either for one message processed
        # at a time, and a link would cost a tenth of the span's price again on every task.
        span = self._tracer.start_span(
            f"process {signature.name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=self._attributes(signature, "process"),
        )
        # Current from here to after_process: the middleware, the task and its callbacks
        # share one contextvars context (the thread of a def task included).
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        self._processing.set((span, token))

    def after_process(self, signature: Signature, outcome: Outcome) -> None:
        held = self._processing.get()
        if held is None:
            return
        span, token = held
        self._processing.set(None)
        span.set_attribute("machinery.task.state", outcome.state)
        if outcome.state == FAILURE:
            span.set_status(Status(StatusCode.ERROR, outcome.error))
            if outcome.exception is not None:
                span.record_exception(outcome.exception)
        elif outcome.state == RETRY:
            if outcome.retry_in is not None:
                span.set_attribute("machinery.retry_in", outcome.retry_in)
            if outcome.exception is not None:
                span.record_exception(outcome.exception)
        span.end()
        otel_context.detach(token)

    def _attributes(self, signature: Signature, operation: str) -> dict[str, str | int | bool]:
        attributes: dict[str, str | int | bool] = {
            "messaging.system": self.messaging_system,
            "messaging.operation.type": operation,
            "messaging.message.id": signature.uuid,
            "machinery.task.name": signature.name,
            "machinery.retry_count": signature.retry_count,
        }
        if signature.chord_callback is not None:  # a chord's member: the callback it may send
            attributes["machinery.chord_callback"] = signature.chord_callback.uuid
        if signature.routing_key:
            attributes["messaging.destination.name"] = signature.routing_key
        if signature.group_uuid:
            attributes["machinery.group_uuid"] = signature.group_uuid
        return attributes


def _carried(signature: Signature) -> Iterator[Signature]:
    """The signatures that travel inside ``signature`` (callbacks, later chain steps, the
    chord callback), at any depth."""
    stack = [signature]
    while stack:
        current = stack.pop()
        for nested in (*(current.on_success or ()), *(current.on_error or ()), current.chord_callback):
            if nested is not None:
                yield nested
                stack.append(nested)
