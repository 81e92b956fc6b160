<?php
/**
 * The module's plain-PHP logic without breakwater, RabbitMQ or Magento:
 * `php examples/magento/tests/unit.php` (exit 0 when every check passed).
 */
declare(strict_types=1);

require __DIR__ . '/bootstrap.php';

use Breakwater\AiBridge\Api\AnswerApplierInterface;
use Breakwater\AiBridge\Client\BreakwaterClient;
use Breakwater\AiBridge\Client\BreakwaterResponse;
use Breakwater\AiBridge\Client\BreakwaterUnavailableException;
use Breakwater\AiBridge\Client\Uuid;
use Breakwater\AiBridge\Model\ReplayResult;
use Breakwater\AiBridge\Result\ResultHandler;
use Breakwater\AiBridge\Result\ResultMessage;
use Breakwater\AiBridge\Store\FilePendingStore;

$dir = sys_get_temp_dir() . '/bw-magento-unit-' . bin2hex(random_bytes(4));
mkdir($dir);

// Headers: names and token values read whatever their case.
$r = BreakwaterResponse::fromHeaderLines(202, [
    'HTTP/1.1 202 Accepted',
    'X-Breakwater-Outcome: Fallback',
    'X-BREAKWATER-FALLBACK: static',
    'x-breakwater-reason: Upstream_5xx',
    'X-Breakwater-DLQ: Queued',
    'X-Breakwater-Model-Version: Grader-V3',
    'X-Request-Id: sent-id',
], '{"status":"queued"}', 'sent-id');
Check::same('fallback', $r->outcome(), 'outcome read case-insensitively');
Check::same('static', $r->fallback(), 'fallback kind');
Check::same('upstream_5xx', $r->reason(), 'reason');
Check::same('queued', $r->dlq(), 'dlq');
Check::that($r->awaitsReplay(), 'queued awaits replay');
Check::same('Grader-V3', $r->modelVersion(), 'model version kept as sent');
Check::same('fallback', $r->header('X-BREAKWATER-OUTCOME') === null ? null : strtolower($r->header('X-BREAKWATER-OUTCOME')), 'header() any case');
$spooled = BreakwaterResponse::fromHeaderLines(202, ['x-breakwater-dlq: spooled', 'x-request-id: other'], '', 'sent');
Check::that($spooled->awaitsReplay(), 'spooled awaits replay');
Check::same('other', $spooled->requestId, 'the request id breakwater echoed wins');
$rejected = BreakwaterResponse::fromHeaderLines(202, ['x-breakwater-dlq: rejected'], '', 'sent');
Check::that(!$rejected->awaitsReplay(), 'rejected does not await a replay');
$continued = BreakwaterResponse::fromHeaderLines(200, ['HTTP/1.1 100 Continue', 'x-breakwater-outcome: error', 'HTTP/1.1 200 OK', 'x-breakwater-outcome: ai'], '', 's');
Check::same('ai', $continued->outcome(), 'only the final header block counts');

Check::that((bool) preg_match('/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/', Uuid::v4()), 'uuid v4');

// Client: its timeout is above the route's deadline; an unreachable breakwater is an exception.
$store = new FilePendingStore("$dir/pending.json");
$client = new BreakwaterClient('http://127.0.0.1:9', 'grading', 800, $store, 500, 200);
Check::same(1300, $client->timeoutMs(), 'timeout = route deadline + headroom');
Check::throws(\InvalidArgumentException::class, fn () => new BreakwaterClient('http://x', 'r', 800, $store, 0), 'no headroom refused');
Check::throws(BreakwaterUnavailableException::class, fn () => $client->post('/v1/grading', '{}'), 'unreachable breakwater: exception');
Check::same([], $store->pending(), 'nothing pending when breakwater never answered');

// Result messages: schema 2 and schema 1 read the same.
$v2 = ResultMessage::fromJson(json_encode([
    'schema_v' => 2, 'msg_id' => 'm1', 'request_id' => 'r1', 'route' => 'grading', 'status' => 200,
    'model_version' => 'grader-v3', 'upstream' => 'grader',
    'headers' => ['Content-Type' => 'application/json', 'x-model-version' => 'grader-v3'],
    'body' => '{"grade":"B+"}', 'replayed_at' => 't', 'attempts' => 1,
]));
$v1 = ResultMessage::fromJson(json_encode([
    'msg_id' => 'm1', 'request_id' => 'r1', 'route' => 'grading', 'status' => 200,
    'model_version' => 'grader-v3', 'upstream' => 'grader',
    'headers' => [['content-type', 'application/json'], ['x-model-version', 'grader-v3']],
    'body_b64' => base64_encode('{"grade":"B+"}'), 'replayed_at' => 't', 'attempts' => 1,
]));
Check::same(['grade' => 'B+'], $v2->json(), 'schema 2 text body');
Check::same('application/json', $v2->headers['content-type'], 'schema 2 headers object, names lower-cased');
Check::same($v2->body, $v1->body, 'schema 1 body_b64 decodes to the same body');
Check::same($v2->headers, $v1->headers, 'schema 1 header pairs read as the same object');
Check::same(2, $v2->schemaV, 'schema_v 2');
Check::same(1, $v1->schemaV, 'no schema_v is schema 1');
$bin = ResultMessage::fromArray(['request_id' => 'r2', 'body_b64' => base64_encode("\xff\x00")]);
Check::same("\xff\x00", $bin->body, 'binary body from body_b64');
Check::throws(\InvalidArgumentException::class, fn () => ResultMessage::fromArray(['request_id' => 'r3']), 'no body refused');
Check::throws(\InvalidArgumentException::class, fn () => ResultMessage::fromArray(['body' => 'x']), 'no request_id refused');
Check::throws(\InvalidArgumentException::class, fn () => ResultMessage::fromJson('[1'), 'not JSON refused');

// What Magento's decoder builds reads the same as the raw JSON.
$dto = (new ReplayResult())->setSchemaV(2)->setMsgId('m1')->setRequestId('r1')->setRoute('grading')
    ->setStatus(200)->setModelVersion('grader-v3')->setUpstream('grader')
    ->setHeaders(['content-type' => 'application/json', 'x-model-version' => 'grader-v3'])
    ->setBody('{"grade":"B+"}')->setReplayedAt('t')->setAttempts(1);
Check::that($v2 == ResultMessage::fromDataObject($dto), 'data object = raw message');

// Exactly once per request id, and a failing applier leaves the request to a redelivery.
$applier = new class implements AnswerApplierInterface {
    public array $applied = [];
    public bool $fail = false;
    public function apply(ResultMessage $result, ?array $pendingRow): void
    {
        if ($this->fail) {
            throw new \RuntimeException('shop database down');
        }
        $this->applied[] = [$result->requestId, $pendingRow['route'] ?? null];
    }
};
$store->recordPending('r1', 'grading', 'queued', ['order' => 7]);
$store->recordPending('r1', 'grading', 'queued', ['order' => 8]);
Check::same(['order' => 7], $store->find('r1')['context'], 'recordPending is idempotent');
$handler = new ResultHandler($store, $applier);
$applier->fail = true;
Check::throws(\RuntimeException::class, fn () => $handler->handle($v2), 'a failing applier propagates');
Check::same('pending', $store->find('r1')['state'], 'and the request stays pending');
$applier->fail = false;
Check::that($handler->handle($v2), 'applied on the redelivery');
Check::that(!$handler->handle($v2), 'a second delivery is not applied');
Check::that(!$handler->handle($v1), 'nor the same request id in the old format');
Check::same([['r1', 'grading']], $applier->applied, 'applier ran once, with the pending row');
Check::same('applied', $store->find('r1')['state'], 'row applied');
Check::same(200, $store->find('r1')['result']['status'], 'result kept');
Check::same([], $store->pending(), 'nothing pending');
Check::that($handler->handle($bin), 'a result without a pending row is applied too');
$store->recordPending('r2', 'grading', 'queued');
Check::same('applied', $store->find('r2')['state'], 'a late pending row does not undo an applied one');

array_map('unlink', glob("$dir/*") ?: []);
rmdir($dir);
echo 'unit: ' . Check::$passed . " checks passed\n";
