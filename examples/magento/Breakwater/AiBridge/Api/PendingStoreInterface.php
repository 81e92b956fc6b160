<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Api;

/**
 * Requests breakwater answered with a fallback and queued for replay (`x-breakwater-dlq:
 * queued | spooled`), and which of them have had their replayed answer applied.
 *
 * Implementations: Store\FilePendingStore (plain PHP, used by the tests) and
 * Magento\DbPendingStore (Magento's DB connection, table breakwater_ai_pending).
 */
interface PendingStoreInterface
{
    public const STATE_PENDING = 'pending';
    public const STATE_APPLIED = 'applied';

    /**
     * Records a request waiting for its replayed answer. Idempotent per request id; a
     * request already applied stays applied.
     *
     * @param array<string, scalar|null> $context what the shop needs to apply the answer later
     */
    public function recordPending(string $requestId, string $route, string $dlq, array $context = []): void;

    /**
     * Runs $apply at most once per request id, inside the store's lock or transaction, and
     * marks the request applied with $result. Returns true when $apply ran now, false when
     * the request had already been applied (a redelivered or duplicated message). When
     * $apply throws, nothing is marked and the exception propagates (the message is then
     * rejected or redelivered, and applied later).
     *
     * @param array<string, mixed> $result
     * @param callable(?array): void $apply receives the pending row, or null if none was recorded
     */
    public function applyOnce(string $requestId, array $result, callable $apply): bool;

    /**
     * The row of one request: request_id, route, dlq, state, context, created_at,
     * applied_at, result; null when unknown.
     *
     * @return array<string, mixed>|null
     */
    public function find(string $requestId): ?array;

    /**
     * Rows still waiting for their answer, by request id.
     *
     * @return array<string, array<string, mixed>>
     */
    public function pending(): array;
}
