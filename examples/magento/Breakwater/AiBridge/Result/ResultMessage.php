<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Result;

use Breakwater\AiBridge\Api\Data\ReplayResultInterface;

/**
 * One replay result from breakwater.results.<route>, read from either format: schema_v 2
 * (headers as an object, `body` text or `body_b64`) and the first one (no schema_v, headers
 * as [name, value] pairs, always `body_b64`), so a backlog from before an upgrade still reads.
 */
final class ResultMessage
{
    /**
     * @param array<string, string> $headers lower-case name => value
     */
    public function __construct(
        public readonly string $requestId,
        public readonly string $msgId,
        public readonly string $route,
        public readonly int $status,
        public readonly ?string $modelVersion,
        public readonly array $headers,
        public readonly string $body,
        public readonly string $replayedAt,
        public readonly int $attempts,
        public readonly int $schemaV
    ) {
    }

    public static function fromJson(string $json): self
    {
        try {
            $data = json_decode($json, true, 64, JSON_THROW_ON_ERROR);
        } catch (\JsonException $e) {
            throw new \InvalidArgumentException('a replay result is not JSON: ' . $e->getMessage(), 0, $e);
        }
        if (!is_array($data)) {
            throw new \InvalidArgumentException('a replay result is not a JSON object');
        }
        return self::fromArray($data);
    }

    /** @param array<string, mixed> $m */
    public static function fromArray(array $m): self
    {
        $requestId = $m['request_id'] ?? null;
        if (!is_string($requestId) || $requestId === '') {
            throw new \InvalidArgumentException('a replay result without request_id');
        }
        $headers = [];
        foreach ((array) ($m['headers'] ?? []) as $k => $v) {
            if (is_array($v)) { // schema 1: [name, value]
                [$k, $v] = [(string) ($v[0] ?? ''), (string) ($v[1] ?? '')];
            }
            $k = strtolower((string) $k);
            $headers[$k] = isset($headers[$k]) ? $headers[$k] . ', ' . $v : (string) $v;
        }
        if (isset($m['body']) && is_string($m['body'])) {
            $body = $m['body'];
        } elseif (isset($m['body_b64']) && is_string($m['body_b64'])) {
            $decoded = base64_decode($m['body_b64'], true);
            if ($decoded === false) {
                throw new \InvalidArgumentException("replay result $requestId: body_b64 is not base64");
            }
            $body = $decoded;
        } else {
            throw new \InvalidArgumentException("replay result $requestId has neither body nor body_b64");
        }
        return new self(
            $requestId,
            (string) ($m['msg_id'] ?? ''),
            (string) ($m['route'] ?? ''),
            (int) ($m['status'] ?? 0),
            isset($m['model_version']) ? (string) $m['model_version'] : null,
            $headers,
            $body,
            (string) ($m['replayed_at'] ?? ''),
            (int) ($m['attempts'] ?? 0),
            (int) ($m['schema_v'] ?? 1)
        );
    }

    /** What Magento's decoder made of the message (topics ai.result.<route>). */
    public static function fromDataObject(ReplayResultInterface $r): self
    {
        return self::fromArray([
            'schema_v' => $r->getSchemaV(),
            'msg_id' => $r->getMsgId(),
            'request_id' => $r->getRequestId(),
            'route' => $r->getRoute(),
            'status' => $r->getStatus(),
            'model_version' => $r->getModelVersion(),
            'headers' => $r->getHeaders(),
            'body' => $r->getBody(),
            'body_b64' => $r->getBodyB64(),
            'replayed_at' => $r->getReplayedAt(),
            'attempts' => $r->getAttempts(),
        ]);
    }

    /** @return mixed the AI's answer decoded as JSON (null when it is not JSON) */
    public function json(): mixed
    {
        try {
            return json_decode($this->body, true, 512, JSON_THROW_ON_ERROR);
        } catch (\JsonException) {
            return null;
        }
    }

    /** What the pending store keeps of an applied result. @return array<string, mixed> */
    public function toStored(): array
    {
        return [
            'msg_id' => $this->msgId,
            'route' => $this->route,
            'status' => $this->status,
            'model_version' => $this->modelVersion,
            'headers' => $this->headers,
            'body_b64' => base64_encode($this->body),
            'replayed_at' => $this->replayedAt,
            'attempts' => $this->attempts,
        ];
    }
}
