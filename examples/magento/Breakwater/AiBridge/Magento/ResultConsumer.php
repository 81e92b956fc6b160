<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Magento;

use Breakwater\AiBridge\Api\Data\ReplayResultInterface;
use Breakwater\AiBridge\Result\ResultHandler;
use Breakwater\AiBridge\Result\ResultMessage;
use Psr\Log\LoggerInterface;

/**
 * Thin Magento adapter: the handler of the consumers breakwater.results.<route>
 * (etc/queue_consumer.xml). Magento has already decoded the message into a
 * ReplayResultInterface and locked its message_id; the plain ResultHandler applies it once
 * per request_id. An exception makes Magento reject the message (see the dead-letter policy
 * in the module README for where it goes).
 */
class ResultConsumer
{
    public function __construct(
        private readonly ResultHandler $handler,
        private readonly LoggerInterface $logger
    ) {
    }

    public function process(ReplayResultInterface $result): void
    {
        $message = ResultMessage::fromDataObject($result);
        $applied = $this->handler->handle($message);
        $this->logger->info('breakwater replay result', [
            'request_id' => $message->requestId,
            'route' => $message->route,
            'status' => $message->status,
            'model_version' => $message->modelVersion,
            'applied' => $applied ? 'now' : 'before',
        ]);
    }
}
