<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Client;

use Breakwater\AiBridge\Api\PendingStoreInterface;

/**
 * Calls one breakwater route (plain PHP, curl). What it does on every call:
 * - sends its own `x-request-id` (a UUID), which breakwater keeps and the replay result carries;
 * - on POST sends `Idempotency-Key` (the caller's, or a new UUID), which breakwater's replay
 *   sends to the AI again;
 * - waits longer than the route's deadline (`timeout_ms` in breakwater.toml, retries
 *   included) plus a headroom, so breakwater's fallback, not this client, answers a slow AI;
 * - never retries, a 5xx included: breakwater already retried within its budget, and a
 *   second call would only add load to a failing AI and a second DLQ entry;
 * - on `x-breakwater-dlq: queued | spooled` records a pending row, which ResultHandler
 *   completes once breakwater replays the request.
 */
class BreakwaterClient
{
    private int $timeoutMs;

    /**
     * @param string $baseUrl    breakwater's data plane, e.g. http://127.0.0.1:8080
     * @param string $route      the route's `name` in breakwater.toml (recorded with pending rows)
     * @param int    $routeTimeoutMs the route's `timeout_ms`
     * @param int    $headroomMs added to the route's deadline (fallback chain, network)
     */
    public function __construct(
        private readonly string $baseUrl,
        private readonly string $route,
        int $routeTimeoutMs,
        private readonly PendingStoreInterface $pendingStore,
        int $headroomMs = 1000,
        private readonly int $connectTimeoutMs = 1000
    ) {
        if ($routeTimeoutMs <= 0 || $headroomMs <= 0) {
            throw new \InvalidArgumentException('routeTimeoutMs and headroomMs must be positive');
        }
        $this->timeoutMs = $routeTimeoutMs + $headroomMs;
    }

    /** The whole-call timeout: always above the route's deadline. */
    public function timeoutMs(): int
    {
        return $this->timeoutMs;
    }

    /** @param array<string, string> $headers */
    public function get(string $path, array $headers = []): BreakwaterResponse
    {
        return $this->send('GET', $path, null, $headers);
    }

    /**
     * @param array<string, string> $headers
     * @param array<string, scalar|null> $context kept with the pending row if the request is queued
     */
    public function post(string $path, string $body, array $headers = [], ?string $idempotencyKey = null, array $context = []): BreakwaterResponse
    {
        return $this->send('POST', $path, $body, $headers, $idempotencyKey ?? Uuid::v4(), $context);
    }

    /**
     * One HTTP call, no retry.
     *
     * @param array<string, string> $headers
     * @param array<string, scalar|null> $context
     * @throws BreakwaterUnavailableException breakwater unreachable or not answering in time
     */
    public function send(string $method, string $path, ?string $body, array $headers = [], ?string $idempotencyKey = null, array $context = []): BreakwaterResponse
    {
        $requestId = Uuid::v4();
        $lines = [
            'x-request-id: ' . $requestId,
            'Expect:', // no 100-continue round trip for larger bodies
        ];
        if ($idempotencyKey !== null) {
            $lines[] = 'Idempotency-Key: ' . $idempotencyKey;
        }
        foreach ($headers as $name => $value) {
            $lower = strtolower((string) $name);
            if ($lower === 'x-request-id' || $lower === 'idempotency-key') {
                continue; // this client owns both
            }
            $lines[] = $name . ': ' . $value;
        }
        if ($body !== null && !isset(array_change_key_case($headers)['content-type'])) {
            $lines[] = 'Content-Type: application/json';
        }

        $received = [];
        $ch = curl_init(rtrim($this->baseUrl, '/') . $path);
        if ($ch === false) {
            throw new BreakwaterUnavailableException('curl_init failed', $requestId);
        }
        $opts = [
            CURLOPT_CUSTOMREQUEST => $method,
            CURLOPT_HTTPHEADER => $lines,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_FOLLOWLOCATION => false,
            CURLOPT_TIMEOUT_MS => $this->timeoutMs,
            CURLOPT_CONNECTTIMEOUT_MS => $this->connectTimeoutMs,
            CURLOPT_NOSIGNAL => true, // millisecond timeouts without SIGALRM
            CURLOPT_HTTP_VERSION => CURL_HTTP_VERSION_1_1,
            CURLOPT_HEADERFUNCTION => static function ($h, string $line) use (&$received): int {
                $trimmed = rtrim($line, "\r\n");
                if ($trimmed !== '') {
                    $received[] = $trimmed;
                }
                return strlen($line);
            },
        ];
        if ($body !== null) {
            $opts[CURLOPT_POSTFIELDS] = $body;
        }
        curl_setopt_array($ch, $opts);
        $answer = curl_exec($ch);
        $status = (int) curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
        $error = curl_error($ch);
        curl_close($ch);
        if ($answer === false || $status === 0) {
            throw new BreakwaterUnavailableException("breakwater did not answer $method $path: $error", $requestId);
        }

        $response = BreakwaterResponse::fromHeaderLines($status, $received, (string) $answer, $requestId);
        if ($response->awaitsReplay()) {
            $this->pendingStore->recordPending(
                $response->requestId,
                $this->route,
                (string) $response->dlq(),
                $context + ['method' => $method, 'path' => $path, 'idempotency_key' => $idempotencyKey]
            );
        }
        return $response;
    }
}
