<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Magento;

use Breakwater\AiBridge\Api\PendingStoreInterface;
use Magento\Framework\App\ResourceConnection;

/**
 * Sketch of PendingStoreInterface on Magento's database (table breakwater_ai_pending,
 * etc/db_schema.xml). applyOnce runs the applier in the same transaction that marks the row
 * applied, with the row locked (SELECT ... FOR UPDATE), so two consumers given the same
 * request id (a redelivery, a duplicate publish) apply it once. Not exercised by the tests
 * here (they run without Magento: Store\FilePendingStore implements the same contract).
 */
class DbPendingStore implements PendingStoreInterface
{
    private const TABLE = 'breakwater_ai_pending';

    public function __construct(private readonly ResourceConnection $resource)
    {
    }

    public function recordPending(string $requestId, string $route, string $dlq, array $context = []): void
    {
        $db = $this->resource->getConnection();
        // INSERT ... ON DUPLICATE KEY UPDATE with no updated columns: a row that exists
        // (pending or applied) is left as it is.
        $db->insertOnDuplicate($this->resource->getTableName(self::TABLE), [
            'request_id' => $requestId,
            'route' => $route,
            'dlq' => $dlq,
            'state' => self::STATE_PENDING,
            'context' => json_encode($context, JSON_THROW_ON_ERROR),
        ], ['request_id']);
    }

    public function applyOnce(string $requestId, array $result, callable $apply): bool
    {
        $db = $this->resource->getConnection();
        $table = $this->resource->getTableName(self::TABLE);
        $db->beginTransaction();
        try {
            // A result may come before its pending row (the shop crashed after the call):
            // make sure a row exists to lock.
            $db->insertOnDuplicate($table, [
                'request_id' => $requestId,
                'route' => (string) ($result['route'] ?? ''),
                'dlq' => '',
                'state' => self::STATE_PENDING,
                'context' => '{}',
            ], ['request_id']);
            $row = $db->fetchRow(
                $db->select()->from($table)->where('request_id = ?', $requestId)->forUpdate(true)
            );
            if (($row['state'] ?? null) === self::STATE_APPLIED) {
                $db->rollBack();
                return false;
            }
            $apply($this->decode($row ?: null));
            $db->update($table, [
                'state' => self::STATE_APPLIED,
                'applied_at' => gmdate('Y-m-d H:i:s'),
                'result' => json_encode($result, JSON_THROW_ON_ERROR),
            ], ['request_id = ?' => $requestId]);
            $db->commit();
            return true;
        } catch (\Throwable $e) {
            $db->rollBack();
            throw $e;
        }
    }

    public function find(string $requestId): ?array
    {
        $db = $this->resource->getConnection();
        $row = $db->fetchRow(
            $db->select()->from($this->resource->getTableName(self::TABLE))->where('request_id = ?', $requestId)
        );
        return $this->decode($row ?: null);
    }

    public function pending(): array
    {
        $db = $this->resource->getConnection();
        $rows = $db->fetchAll(
            $db->select()->from($this->resource->getTableName(self::TABLE))->where('state = ?', self::STATE_PENDING)
        );
        $out = [];
        foreach ($rows as $row) {
            $out[$row['request_id']] = $this->decode($row);
        }
        return $out;
    }

    /** @param array<string, mixed>|null $row */
    private function decode(?array $row): ?array
    {
        if ($row === null) {
            return null;
        }
        $row['context'] = json_decode((string) ($row['context'] ?? '{}'), true) ?: [];
        $row['result'] = isset($row['result']) ? json_decode((string) $row['result'], true) : null;
        return $row;
    }
}
