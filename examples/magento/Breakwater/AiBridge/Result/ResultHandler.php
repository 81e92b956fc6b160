<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Result;

use Breakwater\AiBridge\Api\AnswerApplierInterface;
use Breakwater\AiBridge\Api\PendingStoreInterface;

/**
 * Applies a replayed answer by request_id, exactly once. RabbitMQ delivers at least once
 * (a consumer that dies before its ack gets the message again; breakwater may publish a
 * result twice if its own ack was lost), and Magento's message lock only covers one
 * message_id: the pending store's applyOnce is what makes the second delivery a no-op.
 */
class ResultHandler
{
    public function __construct(
        private readonly PendingStoreInterface $store,
        private readonly AnswerApplierInterface $applier
    ) {
    }

    /** True when the answer was applied now, false when it had been applied before. */
    public function handle(ResultMessage $result): bool
    {
        return $this->store->applyOnce(
            $result->requestId,
            $result->toStored(),
            function (?array $pendingRow) use ($result): void {
                $this->applier->apply($result, $pendingRow);
            }
        );
    }
}
