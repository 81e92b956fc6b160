<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Model;

use Breakwater\AiBridge\Api\Data\ReplayResultInterface;

/** Plain data object behind ReplayResultInterface (no Magento base class needed). */
class ReplayResult implements ReplayResultInterface
{
    private int $schemaV = 1;
    private string $msgId = '';
    private string $requestId = '';
    private string $route = '';
    private int $status = 0;
    private ?string $modelVersion = null;
    private string $upstream = '';
    /** @var array<string, string> */
    private array $headers = [];
    private ?string $body = null;
    private ?string $bodyB64 = null;
    private string $replayedAt = '';
    private int $attempts = 0;

    public function getSchemaV() { return $this->schemaV; }
    public function setSchemaV($schemaV) { $this->schemaV = (int) $schemaV; return $this; }
    public function getMsgId() { return $this->msgId; }
    public function setMsgId($msgId) { $this->msgId = (string) $msgId; return $this; }
    public function getRequestId() { return $this->requestId; }
    public function setRequestId($requestId) { $this->requestId = (string) $requestId; return $this; }
    public function getRoute() { return $this->route; }
    public function setRoute($route) { $this->route = (string) $route; return $this; }
    public function getStatus() { return $this->status; }
    public function setStatus($status) { $this->status = (int) $status; return $this; }
    public function getModelVersion() { return $this->modelVersion; }
    public function setModelVersion($modelVersion) { $this->modelVersion = $modelVersion === null ? null : (string) $modelVersion; return $this; }
    public function getUpstream() { return $this->upstream; }
    public function setUpstream($upstream) { $this->upstream = (string) $upstream; return $this; }
    public function getHeaders() { return $this->headers; }
    public function setHeaders($headers) { $this->headers = array_map('strval', (array) $headers); return $this; }
    public function getBody() { return $this->body; }
    public function setBody($body) { $this->body = $body === null ? null : (string) $body; return $this; }
    public function getBodyB64() { return $this->bodyB64; }
    public function setBodyB64($bodyB64) { $this->bodyB64 = $bodyB64 === null ? null : (string) $bodyB64; return $this; }
    public function getReplayedAt() { return $this->replayedAt; }
    public function setReplayedAt($replayedAt) { $this->replayedAt = (string) $replayedAt; return $this; }
    public function getAttempts() { return $this->attempts; }
    public function setAttempts($attempts) { $this->attempts = (int) $attempts; return $this; }
}
