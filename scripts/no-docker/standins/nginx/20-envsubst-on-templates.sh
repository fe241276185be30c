#!/bin/sh
# As in the official nginx image: render every *.template under /etc/nginx/templates with envsubst
# into /etc/nginx/conf.d (same sub-directories, suffix removed), substituting only variables that
# are set in the environment (optionally only names matching NGINX_ENVSUBST_FILTER, a regex).
# Also *.stream-template into stream-conf.d when NGINX_ENVSUBST_STREAM_OUTPUT_DIR exists.
#   NGINX_ENVSUBST_TEMPLATE_DIR     (default /etc/nginx/templates)
#   NGINX_ENVSUBST_TEMPLATE_SUFFIX  (default .template)
#   NGINX_ENVSUBST_OUTPUT_DIR       (default /etc/nginx/conf.d)
set -e

ME=$(basename "$0")

entrypoint_log() {
    if [ -z "${NGINX_ENTRYPOINT_QUIET_LOGS:-}" ]; then
        echo "$@"
    fi
}

# render TEMPLATE_DIR SUFFIX OUTPUT_DIR
render() {
    template_dir="$1"
    suffix="$2"
    output_dir="$3"
    # shellcheck disable=SC2016,SC2046  # literal ${NAME} list; one word per variable name
    defined_envs=$(printf '${%s} ' $(awk -v filter="${NGINX_ENVSUBST_FILTER:-}" \
        'END { for (name in ENVIRON) if (name ~ filter) print name }' </dev/null))

    [ -d "$template_dir" ] || return 0
    if [ ! -w "$output_dir" ]; then
        entrypoint_log "$ME: ERROR: $template_dir exists, but $output_dir is not writable"
        return 0
    fi
    find "$template_dir" -follow -type f -name "*$suffix" -print | while read -r template; do
        relative_path="${template#"$template_dir/"}"
        output_path="$output_dir/${relative_path%"$suffix"}"
        subdir=$(dirname "$relative_path")
        mkdir -p "$output_dir/$subdir"
        entrypoint_log "$ME: Running envsubst on $template to $output_path"
        envsubst "$defined_envs" <"$template" >"$output_path"
    done
}

render "${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}" \
    "${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}" \
    "${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}"

stream_output_dir="${NGINX_ENVSUBST_STREAM_OUTPUT_DIR:-/etc/nginx/stream-conf.d}"
if [ -d "$stream_output_dir" ]; then
    render "${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}" \
        "${NGINX_ENVSUBST_STREAM_TEMPLATE_SUFFIX:-.stream-template}" \
        "$stream_output_dir"
fi

exit 0
