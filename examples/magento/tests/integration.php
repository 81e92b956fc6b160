<?php
/**
 * The module against a real breakwater, a real mock AI and the local RabbitMQ.
 * Run by tests/magento.rs (cargo test --test magento), which starts both and sets:
 *   BW_URL         breakwater's data plane, e.g. http://127.0.0.1:8080
 *   BW_ADMIN_URL   its admin API (the test waits on GET /admin/dlq for the DLQ publisher)
 *   MOCK_AI_URL    the mock AI (faults at POST /__mock/faults, counters at /__mock/stats)
 *   BW_ROUTE       the replayable route on /v1/grading (its results: ai.result.<route>)
 *   BW_ROUTE_TIMEOUT_MS  that route's timeout_ms
 *   BW_STATE_DIR   a scratch directory (the pending store's file)
 *   BW_DEAD_QUEUE  optional: a queue bound to the dead-letter exchange of the README's
 *                  policy (set on this route's results queue); then one answer the shop
 *                  cannot apply is rejected, as Magento does, and must arrive there
 *   AMQP_HOST, AMQP_PORT, AMQP_USER, AMQP_PASSWORD, AMQP_VHOST (default the local guest)
 * Also on that breakwater: /v1/recommendations (not replayable, static fallback) and
 * /v1/pricing (no fallback). Exit 0 when every check passed.
 */
declare(strict_types=1);

require __DIR__ . '/bootstrap.php';

use Breakwater\AiBridge\Api\AnswerApplierInterface;
use Breakwater\AiBridge\Client\BreakwaterClient;
use Breakwater\AiBridge\Result\ResultHandler;
use Breakwater\AiBridge\Result\ResultMessage;
use Breakwater\AiBridge\Store\FilePendingStore;

function env(string $name, ?string $default = null): string
{
    $v = getenv($name);
    if ($v === false || $v === '') {
        if ($default === null) {
            fwrite(STDERR, "FAIL - environment variable $name is not set\n");
            exit(2);
        }
        return $default;
    }
    return $v;
}

function mock(string $what, ?array $body = null): array
{
    $ch = curl_init(rtrim(env('MOCK_AI_URL'), '/') . '/__mock/' . $what);
    curl_setopt_array($ch, [
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_TIMEOUT_MS => 5000,
        CURLOPT_HTTPHEADER => ['content-type: application/json'],
    ] + ($body === null ? [] : [CURLOPT_POSTFIELDS => json_encode($body)]));
    $out = curl_exec($ch);
    curl_close($ch);
    Check::that(is_string($out), "mock AI control $what");
    return json_decode((string) $out, true) ?? [];
}

$route = env('BW_ROUTE');
$stateDir = env('BW_STATE_DIR');
$store = new FilePendingStore("$stateDir/pending.json");
$grading = new BreakwaterClient(env('BW_URL'), $route, (int) env('BW_ROUTE_TIMEOUT_MS'), $store);
$catalog = new BreakwaterClient(env('BW_URL'), 'catalog', (int) env('BW_ROUTE_TIMEOUT_MS'), $store);
$resultsQueue = "breakwater.results.$route";

// What `bin/magento setup:upgrade` declares from etc/queue_topology.xml, for this route: the
// same exchange, the queue with the binding's arguments. RabbitMQ refuses it
// (PRECONDITION_FAILED) unless it is equivalent to what breakwater declares.
$topology = new DOMDocument();
Check::that($topology->load(__DIR__ . '/../Breakwater/AiBridge/etc/queue_topology.xml'), 'queue_topology.xml parses');
$xp = new DOMXPath($topology);
$exchangeEl = $xp->query('/config/exchange')->item(0);
$bindingEl = $xp->query('/config/exchange/binding[@destination="breakwater.results.grading"]')->item(0);
Check::that($exchangeEl instanceof DOMElement && $bindingEl instanceof DOMElement, 'topology has the grading binding');
$queueArgs = [];
foreach ($xp->query('arguments/argument', $bindingEl) as $arg) {
    $queueArgs[$arg->getAttribute('name')] = $arg->textContent;
}
Check::same(['x-queue-type' => 'quorum'], $queueArgs, 'the queue arguments Magento declares');
$exchangeName = $exchangeEl->getAttribute('name');

$amqp = new AMQPConnection([
    'host' => env('AMQP_HOST', '127.0.0.1'),
    'port' => (int) env('AMQP_PORT', '5672'),
    'login' => env('AMQP_USER', 'guest'),
    'password' => env('AMQP_PASSWORD', 'guest'),
    'vhost' => env('AMQP_VHOST', '/'),
    'read_timeout' => 10,
]);
$amqp->connect();

/** Declares like Magento's topology installer; true when the broker accepted it. */
function declareLikeMagento(AMQPConnection $amqp, string $exchangeName, string $queueName, string $key, array $args): AMQPQueue
{
    $ch = new AMQPChannel($amqp);
    $ex = new AMQPExchange($ch);
    $ex->setName($exchangeName);
    $ex->setType(AMQP_EX_TYPE_TOPIC);
    $ex->setFlags(AMQP_DURABLE);
    $ex->declareExchange();
    $q = new AMQPQueue($ch);
    $q->setName($queueName);
    $q->setFlags(AMQP_DURABLE);
    $q->setArguments($args);
    $q->declareQueue();
    $q->bind($exchangeName, $key, $args);
    return $q;
}

try {
    declareLikeMagento($amqp, $exchangeName, $resultsQueue, "ai.result.$route", $queueArgs);
    Check::that(true, "Magento's declaration of $resultsQueue accepted (before breakwater's)");
} catch (AMQPException $e) {
    Check::that(false, "Magento's declaration of $resultsQueue", $e->getMessage());
}

// 1. The AI answers.
mock('reset');
mock('faults', ['model_version' => 'grader-v3']);
$ok = $grading->post('/v1/grading', '{"essay":"ai"}');
Check::same(200, $ok->status, 'AI answer: 200');
Check::same('ai', $ok->outcome(), 'AI answer: outcome ai');
Check::same('grader-v3', $ok->modelVersion(), 'AI answer: model version');
Check::same(null, $ok->dlq(), 'AI answer: nothing queued');
Check::same([1, 2, 3], $ok->json()['items'] ?? null, "AI answer: the AI's body");
Check::that((bool) preg_match('/^[0-9a-f-]{36}$/', $ok->requestId), 'our x-request-id came back', $ok->requestId);

// 2. The AI is down: fallbacks, and the replayable route queues.
mock('faults', ['error_rate' => 1.0, 'error_status' => 503]);
$fb = $catalog->get('/v1/recommendations');
Check::same(200, $fb->status, 'fallback: status of the static fallback');
Check::same('fallback', $fb->outcome(), 'fallback: outcome');
Check::same('static', $fb->fallback(), 'fallback: kind');
Check::same('upstream_5xx', $fb->reason(), 'fallback: reason');
Check::same(null, $fb->dlq(), 'fallback on a route that is not replayable: no dlq');

$before = mock('stats')['requests'];
$err = $catalog->get('/v1/pricing');
$after = mock('stats')['requests'];
Check::that($err->status >= 500, 'no fallback left: a 5xx', $err->status);
Check::same('error', $err->outcome(), 'no fallback left: outcome error');
Check::same(1, $after - $before, 'the client did not retry the 5xx (one AI call)');
Check::same($err->requestId, $err->json()['error']['request_id'] ?? null, 'the JSON error names our request id');

// A slow AI: breakwater's deadline ends the call and its fallback answers, not the client's timeout.
mock('faults', ['error_rate' => 0.0, 'delay_ms' => (int) env('BW_ROUTE_TIMEOUT_MS') + 300]);
$t0 = microtime(true);
$slow = $catalog->get('/v1/recommendations');
$took = (microtime(true) - $t0) * 1000;
Check::same('fallback', $slow->outcome(), 'slow AI: fallback');
Check::same('timeout', $slow->reason(), 'slow AI: reason timeout');
Check::that($took < $catalog->timeoutMs(), "slow AI: answered within the client's timeout", $took);
mock('faults', ['error_rate' => 1.0, 'error_status' => 503, 'delay_ms' => 0]);

// breakwater connects its DLQ publisher on first use: the first request may only be
// `spooled` (on disk, published moments later); the next ones are `queued` (confirmed).
$queued = [];
$warmup = $grading->post('/v1/grading', '{"essay":"warm-up"}');
Check::same('fallback', $warmup->outcome(), 'warm-up: outcome fallback');
Check::that($warmup->awaitsReplay(), 'warm-up: queued or spooled', $warmup->headers());
$queued[$warmup->requestId] = 'warm-up';
$deadline = microtime(true) + 15;
do {
    $dlq = json_decode((string) @file_get_contents(rtrim(env('BW_ADMIN_URL'), '/') . '/admin/dlq'), true);
    $connected = ($dlq['broker']['connected'] ?? false) === true;
} while (!$connected && microtime(true) < $deadline && usleep(100_000) === null);
Check::that($connected, "breakwater's DLQ publisher connected to RabbitMQ (GET /admin/dlq)");
for ($i = 0; $i < 3; $i++) {
    $r = $grading->post('/v1/grading', json_encode(['essay' => "queued-$i"]), ['x-student-id' => "s-$i"], null, ['essay' => $i]);
    Check::same('fallback', $r->outcome(), "queued $i: outcome fallback");
    Check::same('queued', $r->dlq(), "queued $i: x-breakwater-dlq", $r->headers());
    $queued[$r->requestId] = $i;
}
Check::same(array_keys($queued), array_keys($store->pending()), 'one pending row per queued request');

// 3. The AI recovers; breakwater replays once its breaker lets it, and publishes each answer.
mock('reset');
$probe = new AMQPQueue(new AMQPChannel($amqp));
$probe->setName($resultsQueue);
$probe->setFlags(AMQP_PASSIVE);
$deadline = microtime(true) + 60;
$depth = 0;
while (microtime(true) < $deadline && ($depth = $probe->declareQueue()) < count($queued)) {
    usleep(200_000);
}
Check::same(count($queued), $depth, "breakwater published every replay result to $resultsQueue");

// Breakwater declared the queue by now: Magento's setup:upgrade again, after it.
try {
    declareLikeMagento($amqp, $exchangeName, $resultsQueue, "ai.result.$route", $queueArgs);
    Check::that(true, "Magento's declaration of $resultsQueue accepted (after breakwater's)");
} catch (AMQPException $e) {
    Check::that(false, "Magento's declaration of $resultsQueue after breakwater's", $e->getMessage());
}

// 4. A php-amqp consumer, as Magento's: the handler applies each request once, even when a
// delivery is not acked (the consumer "dies" after applying) and comes back redelivered.
$applier = new class implements AnswerApplierInterface {
    /** @var array<string, int> */
    public array $applied = [];
    /** A request the shop cannot apply (until it is "cured"). */
    public ?string $poison = null;
    public function apply(ResultMessage $result, ?array $pendingRow): void
    {
        if ($result->requestId === $this->poison) {
            throw new \RuntimeException("the shop cannot apply {$result->requestId} now");
        }
        $this->applied[$result->requestId] = ($this->applied[$result->requestId] ?? 0) + 1;
    }
};
$deadQueue = getenv('BW_DEAD_QUEUE') ?: null;
if ($deadQueue !== null) {
    $applier->poison = $warmup->requestId;
}
$handler = new ResultHandler($store, $applier);
$consumeChannel = new AMQPChannel($amqp);
$consumeChannel->setPrefetchCount(10);
$consumer = new AMQPQueue($consumeChannel);
$consumer->setName($resultsQueue);
$firstDeliveries = [];
$redeliveries = [];
$problems = [];
$rejected = [];
$consume = function (AMQPEnvelope $m, AMQPQueue $q) use ($handler, $queued, $applier, &$firstDeliveries, &$redeliveries, &$rejected, &$problems): bool {
    $raw = json_decode($m->getBody(), true);
    $result = ResultMessage::fromJson($m->getBody());
    if (!isset($queued[$result->requestId])) {
        $problems[] = "a result for a request this test did not queue: {$result->requestId}";
    }
    if ($m->getMessageId() === '' || $m->getMessageId() !== ($raw['msg_id'] ?? null)) {
        $problems[] = "AMQP message_id {$m->getMessageId()} is not the msg_id";
    }
    if (($raw['schema_v'] ?? null) !== 2 || !is_array($raw['headers']) || array_is_list($raw['headers']) || !is_string($raw['body'] ?? null) || isset($raw['body_b64'])) {
        $problems[] = 'not the decoder-friendly format: ' . $m->getBody();
    }
    try {
        $appliedNow = $handler->handle($result);
    } catch (\RuntimeException $e) {
        // What Magento's consumer does when the handler throws: reject, no requeue.
        $firstDeliveries[$result->requestId] = ($firstDeliveries[$result->requestId] ?? 0) + 1;
        $rejected[$result->requestId] = ($rejected[$result->requestId] ?? 0) + 1;
        $q->reject($m->getDeliveryTag());
        return count($firstDeliveries) < count($queued) || count($redeliveries) < count($queued) - count($rejected);
    }
    if (!$m->isRedelivery()) {
        $firstDeliveries[$result->requestId] = ($firstDeliveries[$result->requestId] ?? 0) + 1;
        if ($appliedNow) {
            $q->nack($m->getDeliveryTag(), AMQP_REQUEUE); // applied, but never acked
            return true;
        }
        $problems[] = "a first delivery of {$result->requestId} was not applied";
    } else {
        $redeliveries[$result->requestId] = ($redeliveries[$result->requestId] ?? 0) + 1;
        if ($appliedNow) {
            $problems[] = "the redelivery of {$result->requestId} was applied again";
        }
    }
    $q->ack($m->getDeliveryTag());
    return count($firstDeliveries) < count($queued) || count($redeliveries) < count($queued) - count($rejected);
};
try {
    $consumer->consume($consume, AMQP_NOPARAM, 'magento-integration-' . bin2hex(random_bytes(4)));
} catch (AMQPException $e) {
    Check::that(false, 'consuming the results', $e->getMessage());
}
$consumer->cancel();
Check::same([], $problems, 'every delivery well-formed and applied as expected');
ksort($firstDeliveries);
$expectOnce = array_fill_keys(array_keys($queued), 1);
ksort($expectOnce);
Check::same($expectOnce, $firstDeliveries, 'each replayed request_id delivered exactly once');
$expectRedelivered = $expectOnce;
if ($deadQueue !== null) {
    Check::same([$warmup->requestId => 1], $rejected, 'the answer the shop could not apply was rejected once');
    unset($expectRedelivered[$warmup->requestId]);
    Check::same('pending', $store->find($warmup->requestId)['state'] ?? null, 'and is still pending');

    // The README's dead-letter policy sends the rejected message to the dead-letter exchange.
    $dead = new AMQPQueue(new AMQPChannel($amqp));
    $dead->setName($deadQueue);
    $deadline = microtime(true) + 10;
    $m = false;
    while (microtime(true) < $deadline && ($m = $dead->get()) === false) {
        usleep(100_000);
    }
    Check::that($m instanceof AMQPEnvelope, "the rejected result reached $deadQueue");
    $result = ResultMessage::fromJson($m->getBody());
    Check::same($warmup->requestId, $result->requestId, 'dead-lettered: the rejected request');
    $death = $m->getHeader('x-death')[0] ?? [];
    Check::same($resultsQueue, $death['queue'] ?? null, 'x-death names the results queue', $m->getHeaders());
    Check::same('rejected', $death['reason'] ?? null, 'x-death reason');
    Check::that($m->getMessageId() !== '' && $m->getMessageId() === $result->msgId, 'dead-lettered: message_id kept');
    // The shop is fixed; an operator moves the message back (shovel) or, here, applies it.
    $applier->poison = null;
    Check::that($handler->handle($result), 'the dead-lettered answer applied once the shop can');
    Check::that(!$handler->handle($result), 'and only once');
    $dead->ack($m->getDeliveryTag());
    Check::same(false, $dead->get(), "nothing else in $deadQueue");
}
ksort($redeliveries);
Check::same($expectRedelivered, $redeliveries, 'each unacked delivery came back once');
$applied = $applier->applied;
ksort($applied);
Check::same($expectOnce, $applied, 'each answer applied exactly once');

usleep(1_500_000);
$left = $probe->declareQueue();
Check::same(0, $left, "nothing more in $resultsQueue (no duplicate publish)");

foreach (array_keys($queued) as $rid) {
    $row = $store->find($rid);
    Check::same('applied', $row['state'] ?? null, "$rid applied in the pending store");
    Check::same(200, $row['result']['status'] ?? null, "$rid: the AI's status");
    Check::same('grader-v3', $row['result']['model_version'] ?? null, "$rid: the AI's model version");
    $body = json_decode(base64_decode($row['result']['body_b64'] ?? ''), true);
    Check::same([1, 2, 3], $body['items'] ?? null, "$rid: the AI's answer");
    Check::same('/v1/grading', $body['path'] ?? null, "$rid: answered for the replayed request");
}
Check::same([], $store->pending(), 'nothing left pending');

$amqp->disconnect();
echo 'integration: ' . Check::$passed . " checks passed\n";
