<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Store;

use Breakwater\AiBridge\Api\PendingStoreInterface;

/**
 * PendingStoreInterface on one JSON file, every operation under an exclusive flock on a
 * lock file beside it, written by rename (a crash leaves the old or the new file, never half
 * of one). For the plain-PHP tests and small single-host setups; Magento uses DbPendingStore.
 */
class FilePendingStore implements PendingStoreInterface
{
    public function __construct(private readonly string $path)
    {
    }

    public function recordPending(string $requestId, string $route, string $dlq, array $context = []): void
    {
        $this->locked(function (array &$rows) use ($requestId, $route, $dlq, $context): void {
            if (isset($rows[$requestId])) {
                return; // recorded already, maybe applied already (the result came first)
            }
            $rows[$requestId] = [
                'request_id' => $requestId,
                'route' => $route,
                'dlq' => $dlq,
                'state' => self::STATE_PENDING,
                'context' => $context,
                'created_at' => gmdate('Y-m-d\TH:i:s\Z'),
                'applied_at' => null,
                'result' => null,
            ];
        });
    }

    public function applyOnce(string $requestId, array $result, callable $apply): bool
    {
        return $this->locked(function (array &$rows) use ($requestId, $result, $apply): bool {
            $row = $rows[$requestId] ?? null;
            if ($row !== null && $row['state'] === self::STATE_APPLIED) {
                return false;
            }
            $apply($row); // throws: nothing written
            $rows[$requestId] = $row ?? [
                'request_id' => $requestId,
                'route' => '',
                'dlq' => '',
                'context' => [],
                'created_at' => gmdate('Y-m-d\TH:i:s\Z'),
            ];
            $rows[$requestId]['state'] = self::STATE_APPLIED;
            $rows[$requestId]['applied_at'] = gmdate('Y-m-d\TH:i:s\Z');
            $rows[$requestId]['result'] = $result;
            return true;
        });
    }

    public function find(string $requestId): ?array
    {
        return $this->locked(fn (array &$rows): ?array => $rows[$requestId] ?? null);
    }

    public function pending(): array
    {
        return $this->locked(fn (array &$rows): array => array_filter(
            $rows,
            fn (array $r): bool => $r['state'] === self::STATE_PENDING
        ));
    }

    /**
     * @template T
     * @param callable(array<string, array<string, mixed>>&): T $fn
     * @return T
     */
    private function locked(callable $fn): mixed
    {
        $lock = fopen($this->path . '.lock', 'c');
        if ($lock === false || !flock($lock, LOCK_EX)) {
            throw new \RuntimeException("cannot lock {$this->path}.lock");
        }
        try {
            $rows = [];
            if (is_file($this->path)) {
                $text = file_get_contents($this->path);
                $rows = $text === false || $text === '' ? [] : json_decode($text, true, 64, JSON_THROW_ON_ERROR);
            }
            $before = $rows;
            $out = $fn($rows);
            if ($rows !== $before) {
                $tmp = $this->path . '.tmp';
                if (file_put_contents($tmp, json_encode($rows, JSON_THROW_ON_ERROR | JSON_PRETTY_PRINT)) === false
                    || !rename($tmp, $this->path)) {
                    throw new \RuntimeException("cannot write {$this->path}");
                }
            }
            return $out;
        } finally {
            flock($lock, LOCK_UN);
            fclose($lock);
        }
    }
}
