//! Trace context that travels with barriers and deployments as a W3C `traceparent`, so the spans
//! a subtask records (alignment, snapshot, upload, restore) join the trace its JobManager started,
//! in whichever process the subtask runs. Without a tracer (no OTLP endpoint) there is no context
//! and nothing travels.
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `traceparent` of `span`, when it is recorded in a trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// The trace id of `span`, when it is recorded in a trace.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let id = cx.span().span_context().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
}

/// Makes `span` (just created, not yet entered) a child of the span `traceparent` names
/// (nothing happens without one, or with one that does not parse), and records its trace id
/// in its `trace_id` field, if it declares one, so that log lines written inside it (JSON logs
/// list their spans' fields) name the trace.
pub fn follow(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let carrier = HashMap::from([("traceparent".to_string(), tp.to_string())]);
        let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
        let _ = span.set_parent(cx);
    }
    if let Some(id) = trace_id(span) {
        span.record("trace_id", id);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_a_tracer_no_context_travels() {
        let span = tracing::info_span!("checkpoint");
        assert_eq!(super::traceparent(&span), None);
        // following a malformed or absent parent is harmless
        super::follow(&span, Some("garbage"));
        super::follow(&span, None);
    }
}
