// The answers nginx gives itself, without a replica, counted by reason: the edge's half of
// "refusals by reason" (the replicas count their own, mnist_rejected_total). Loaded by
// nginx.conf.template with the njs module, which the official nginx image ships.
//
// count runs as the header filter of the error pages (/_errors/), so a request a replica
// answers costs nothing here. The counts live in a shared dictionary (js_shared_dict_zone), one
// set per nginx instance whatever its worker processes, and are read by the Collector from
// metrics, in Prometheus' text format, on the internal status port.

const DICT = 'edge_answers';

// Why nginx answered itself, by the status it sends; busy.json (see reason) is the one page a
// status does not say enough about.
const REASONS = {
    400: 'bad_request',
    403: 'forbidden',
    404: 'not_found',
    405: 'method_not_allowed',
    411: 'length_required',
    413: 'too_large',
    414: 'uri_too_long',
    416: 'range_not_satisfiable',
    429: 'rate_limit',
    431: 'header_too_large',
    500: 'internal',
    501: 'not_implemented',
    502: 'upstream_failed',
    503: 'upstream_failed',
    504: 'upstream_timeout',
    505: 'http_version_not_supported',
};

// Counted from the first scrape on, so that the first of each is a rise Prometheus' rate() sees.
const ALERTED = ['no_replica 503', 'upstream_failed 503', 'upstream_timeout 504', 'rate_limit 429'];

function reason(r) {
    // The @second_pass page: the last peer nginx chose ($upstream_addr lists every try, ", "
    // within a pass and " : " between passes) is either the upstream's name, when no replica
    // could take the request (each at its safety bound, API_MAX_CONNS, or none up), or the
    // address of a replica that failed it.
    if (r.uri === '/_errors/busy.json') {
        const tried = (r.variables.upstream_addr || '').split(/, | : /).pop();
        return tried.indexOf(':') === -1 ? 'no_replica' : 'upstream_failed';
    }
    return REASONS[r.status] || 'other';
}

function count(r) {
    ngx.shared[DICT].incr(`${reason(r)} ${r.status}`, 1, 0);
}

function metrics(r) {
    const dict = ngx.shared[DICT];
    ALERTED.forEach(function (key) {
        dict.add(key, 0);
    });
    const lines = [
        '# HELP mnist_edge_answers_total Requests nginx answered itself with an error, without a replica, by reason.',
        '# TYPE mnist_edge_answers_total counter',
    ];
    // (njs's own engine has neither for...of nor destructuring.)
    dict.items().forEach(function (item) {
        const key = item[0].split(' ');
        lines.push(
            `mnist_edge_answers_total{mnist_reason="${key[0]}",http_response_status_code="${key[1]}"} ${item[1]}`,
        );
    });
    r.headersOut['Content-Type'] = 'text/plain; version=0.0.4';
    r.return(200, `${lines.join('\n')}\n`);
}

export default { count, metrics };
