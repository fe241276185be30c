// The answers nginx gives itself, without a replica, counted by reason: the edge's half of
// "refusals by reason" (the replicas count their own, mnist_rejected_total). Loaded by
// nginx.conf.template with the njs module, which the official nginx image ships.
//
// count runs as the header filter of the error pages (/_errors/), so a request a replica
// answers costs nothing here. The counts live in a shared dictionary (js_shared_dict_zone), one
// set per nginx instance whatever its worker processes, and are read by the Collector from
// metrics, in Prometheus' text format, on the internal status port.

const DICT = 'edge_answers';

// Why nginx answered itself, by the status it sends; busy.json (see count) is the one page a
// status does not say enough about.
const REASONS = {
    400: 'bad_request',
    403: 'forbidden',
    404: 'not_found',
    405: 'method_not_allowed',
    413: 'too_large',
    414: 'uri_too_long',
    429: 'rate_limit',
    431: 'header_too_large',
    500: 'internal',
    502: 'upstream_failed',
    503: 'upstream_failed',
    504: 'upstream_timeout',
};

function reason(r) {
    // Every replica at its safety bound (API_MAX_CONNS), or none up: the @second_pass page.
    if (r.uri === '/_errors/busy.json') {
        return 'no_replica';
    }
    return REASONS[r.status] || 'other';
}

function count(r) {
    ngx.shared[DICT].incr(`${reason(r)} ${r.status}`, 1, 0);
}

function metrics(r) {
    const lines = [
        '# HELP mnist_edge_answers_total Requests nginx answered itself with an error, without a replica, by reason.',
        '# TYPE mnist_edge_answers_total counter',
    ];
    // (njs's own engine has neither for...of nor destructuring.)
    ngx.shared[DICT].items().forEach(function (item) {
        const key = item[0].split(' ');
        lines.push(
            `mnist_edge_answers_total{mnist_reason="${key[0]}",http_response_status_code="${key[1]}"} ${item[1]}`,
        );
    });
    r.headersOut['Content-Type'] = 'text/plain; version=0.0.4';
    r.return(200, `${lines.join('\n')}\n`);
}

export default { count, metrics };
