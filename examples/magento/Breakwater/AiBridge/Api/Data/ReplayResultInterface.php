<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Api\Data;

/**
 * The replay result message (breakwater README, "Replay result messages", schema_v 2) as
 * Magento's MessageEncoder decodes it for the topics ai.result.<route>: every JSON field
 * has a setter here, snake_case to camelCase (request_id -> setRequestId), since the decoder
 * refuses a field it cannot set.
 */
interface ReplayResultInterface
{
    /** @return int */
    public function getSchemaV();

    /**
     * @param int $schemaV
     * @return $this
     */
    public function setSchemaV($schemaV);

    /** @return string */
    public function getMsgId();

    /**
     * @param string $msgId
     * @return $this
     */
    public function setMsgId($msgId);

    /** @return string */
    public function getRequestId();

    /**
     * @param string $requestId
     * @return $this
     */
    public function setRequestId($requestId);

    /** @return string */
    public function getRoute();

    /**
     * @param string $route
     * @return $this
     */
    public function setRoute($route);

    /** @return int */
    public function getStatus();

    /**
     * @param int $status
     * @return $this
     */
    public function setStatus($status);

    /** @return string|null */
    public function getModelVersion();

    /**
     * @param string|null $modelVersion
     * @return $this
     */
    public function setModelVersion($modelVersion);

    /** @return string */
    public function getUpstream();

    /**
     * @param string $upstream
     * @return $this
     */
    public function setUpstream($upstream);

    /** @return string[] header name (lower case) => value */
    public function getHeaders();

    /**
     * @param string[] $headers
     * @return $this
     */
    public function setHeaders($headers);

    /** @return string|null the answer, when it is UTF-8 text */
    public function getBody();

    /**
     * @param string|null $body
     * @return $this
     */
    public function setBody($body);

    /** @return string|null the answer in base64, when it is not UTF-8 */
    public function getBodyB64();

    /**
     * @param string|null $bodyB64
     * @return $this
     */
    public function setBodyB64($bodyB64);

    /** @return string */
    public function getReplayedAt();

    /**
     * @param string $replayedAt
     * @return $this
     */
    public function setReplayedAt($replayedAt);

    /** @return int */
    public function getAttempts();

    /**
     * @param int $attempts
     * @return $this
     */
    public function setAttempts($attempts);
}
