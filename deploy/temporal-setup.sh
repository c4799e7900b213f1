#!/bin/sh
# One-shot job (the temporal-setup service): make sure Keel's namespace and search attributes
# exist on the compose Temporal server. Safe to re-run; `docker compose up` runs it each time.
# Workers also register missing attributes on start. Doing it here, before any worker starts,
# means replicas don't race to register them and the first run can already use them.
set -eu

ns="${TEMPORAL_NAMESPACE:-default}"
retention="${KEEL_NAMESPACE_RETENTION:-168h}"
TEMPORAL_ADDRESS="${TEMPORAL_ADDRESS:-temporal:7233}"
export TEMPORAL_ADDRESS

# name:type. Keep this list the same as SEARCH_ATTRIBUTES in workflows/models.py.
attributes="AgentName:Keyword AgentStatus:Keyword AgentUser:Keyword PendingApprovals:Int AgentSteps:Int TotalTokens:Int AgentTenant:Keyword"

# retry SECONDS COMMAND...: a new namespace takes a few seconds to reach the server's cache.
retry() {
    deadline=$(($(date +%s) + $1))
    shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 2
    done
}

listing() { temporal operator search-attribute list --namespace "$ns" 2>/dev/null; }
has_attribute() { listing | grep -qw "$1"; }

echo "Temporal at $TEMPORAL_ADDRESS, namespace $ns"
retry 120 temporal operator cluster health >/dev/null \
    || { echo "Temporal at $TEMPORAL_ADDRESS is not serving" >&2; exit 1; }

if temporal operator namespace describe --namespace "$ns" >/dev/null 2>&1; then
    echo "namespace $ns: exists"
elif out=$(temporal operator namespace create --namespace "$ns" --retention "$retention" \
        --description "Keel agents" 2>&1); then
    echo "namespace $ns: created (retention $retention)"
elif echo "$out" | grep -qi "already exists"; then
    echo "namespace $ns: exists"
else
    echo "$out" >&2
    exit 1
fi

retry 120 listing >/dev/null \
    || { echo "cannot list search attributes of namespace $ns" >&2; exit 1; }

for spec in $attributes; do
    name=${spec%%:*}
    type=${spec#*:}
    if has_attribute "$name"; then
        echo "search attribute $name: exists"
    elif out=$(temporal operator search-attribute create --namespace "$ns" \
            --name "$name" --type "$type" 2>&1); then
        echo "search attribute $name ($type): created"
    elif echo "$out" | grep -qi "already exists"; then
        echo "search attribute $name: exists"
    else
        echo "$out" >&2
        echo "SQL visibility allows 3 custom Int and 10 Keyword attributes per namespace." >&2
        echo "Keel needs 3 Int; see what else uses them: temporal operator search-attribute list -n $ns" >&2
        exit 1
    fi
done

# Return only once the server lists all of them, so no worker starts before they are usable.
for spec in $attributes; do
    name=${spec%%:*}
    retry 60 has_attribute "$name" \
        || { echo "search attribute $name was created but is not listed" >&2; exit 1; }
done
echo "Keel's search attributes are ready in namespace $ns"
