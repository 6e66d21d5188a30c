#!/usr/bin/env bash
# RabbitMQ policies for assetflow's queues in production: quorum queues with a delivery limit and
# at-least-once dead-lettering to assetflow.dlx, routed to the pool's dead-letter queue.
#
#   ops/rabbitmq/policies.sh                     vhost "assetflow", prefix "assetflow", limit 8
#   VHOST=/ PREFIX=assetflow DELIVERY_LIMIT=8 ops/rabbitmq/policies.sh
#   RABBITMQCTL="rabbitmqctl -n rabbit@mq-1" ops/rabbitmq/policies.sh
#
# The same policies are in ops/rabbitmq/definitions.json (for a fresh broker); this script is for
# a broker that already runs, and is idempotent (set_policy replaces a policy of the same name).
#
# assetflow already declares all of this as queue arguments (src/contracts/topology.rs; see
# `assetflow topology`), on every connection. The policies are the operator's override and safety
# net, within what RabbitMQ lets a policy do (https://www.rabbitmq.com/docs/policies):
#
# - Queue type: a policy cannot set it. assetflow declares x-queue-type=quorum
#   (amqp.queue_type = "quorum", the default); an existing classic queue cannot become a quorum
#   queue: it must be drained, deleted and declared again.
# - delivery-limit: when a quorum queue has both, the LOWER of the policy and the x-delivery-limit
#   argument applies, so a policy can lower the limit, never raise it. assetflow dead-letters a
#   message itself, with its evidence, one delivery before amqp.delivery_limit; a policy below
#   that makes the broker dead-letter first (recorded later as broker_dead_lettered, with less
#   evidence). Keep DELIVERY_LIMIT equal to assetflow's amqp.delivery_limit.
#   Changing amqp.delivery_limit in assetflow's configuration once the queues exist makes every
#   (re)declaration fail with PRECONDITION_FAILED (inequivalent arg 'x-delivery-limit'), and
#   assetflow cannot connect: change it only together with deleting the drained queues.
# - dead-letter-exchange and dead-letter-routing-key: the queue's own arguments win over a
#   policy. The policy applies to queues declared without them.
# - overflow: the policy wins. at-least-once dead-lettering needs reject-publish; any other
#   overflow silently degrades it to at-most-once. Never set drop-head here.
# - Only one policy applies to a queue (the highest priority). Each pool needs its own policy,
#   because the dead-letter routing key is the pool's name; the patterns below are anchored so
#   that they never match a .dlq queue.
# - The .dlq queues get no delivery limit: a dead-letter queue has no dead-letter route, so a
#   message over the limit would be dropped. RabbitMQ 4.x gives every quorum queue a default
#   limit of 20; on 4.x this script sets -1 (no limit) on the .dlq queues.
set -euo pipefail

VHOST=${VHOST:-assetflow}
PREFIX=${PREFIX:-assetflow}
DELIVERY_LIMIT=${DELIVERY_LIMIT:-8}
RABBITMQCTL=${RABBITMQCTL:-rabbitmqctl}
PRIORITY=10

# The prefix as a regular expression: dots are literal.
p=${PREFIX//./\\.}

ctl() {
  # shellcheck disable=SC2086 # RABBITMQCTL may carry options, such as -n rabbit@mq-1
  $RABBITMQCTL "$@"
}

pool_policy() {
  local name=$1 pattern=$2 pool=$3
  echo "policy $name: $pattern -> $PREFIX.dlx / $pool"
  ctl set_policy -p "$VHOST" --apply-to queues --priority "$PRIORITY" "$name" "$pattern" \
    "{\"delivery-limit\": $DELIVERY_LIMIT,
      \"dead-letter-exchange\": \"$PREFIX.dlx\",
      \"dead-letter-routing-key\": \"$pool\",
      \"dead-letter-strategy\": \"at-least-once\",
      \"overflow\": \"reject-publish\"}"
}

# The settlement pool's queue, the unrouted requests (the settlement pool dead-letters them), and
# every partner's settlement-instruction queue.
pool_policy "$PREFIX-settlement" "^$p\\.(settlement|unrouted|partner\\..+)\$" settlement
pool_policy "$PREFIX-issuance" "^$p\\.issuance\$" issuance
# The delivery pool's queue and every gateway's delivery queue.
pool_policy "$PREFIX-delivery" "^$p\\.(delivery|gateway\\..+)\$" delivery

version=$(ctl version 2>/dev/null || echo 0)
if [ "${version%%.*}" -ge 4 ] 2>/dev/null; then
  echo "policy $PREFIX-dead-letter-queues: no delivery limit on the .dlq queues (RabbitMQ $version)"
  ctl set_policy -p "$VHOST" --apply-to queues --priority "$PRIORITY" "$PREFIX-dead-letter-queues" \
    "^$p\\.(settlement|issuance|delivery)\\.dlq\$" '{"delivery-limit": -1}'
fi

echo
ctl list_policies -p "$VHOST"
echo
echo "Check which policy each queue has: $RABBITMQCTL list_queues -p $VHOST name type policy arguments"
